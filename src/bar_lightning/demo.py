"""The offline demo (`make demo`): BAR end to end on Fashion-MNIST, on CPU, with no download.

Stages, each resumable (re-running skips finished work and resumes interrupted training from its last.ckpt):
    1. data         Fashion-MNIST IDX files -> webdataset shards (RGB, 32 px)     outputs/demo/shards
    2. tokenizer    train.py experiment=demo_tokenizer                             outputs/demo/tokenizer
    3. pretokenize  pretokenize.py with the tokenizer's EMA weights               outputs/demo/tokens
    4. generator    train.py experiment=demo_generator (MBM head)                  outputs/demo/generator
    5. classifier   a small Fashion-MNIST CNN: the demo's feature network         outputs/demo/classifier
    6. evaluate     evaluate.py: balanced samples, decoded, scored                 outputs/demo/eval
Results: outputs/demo/metrics.json and outputs/demo/samples.png (one row per class).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bar_lightning.io import atomic_write_json

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                       "t10k-labels-idx1-ubyte"]
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]


def fashion_mnist_present(root: Path) -> bool:
    return all((root / name).is_file() or (root / f"{name}.gz").is_file() for name in FASHION_MNIST_FILES)


def ensure_fashion_mnist(root: Path) -> Path:
    """Install Debian's dataset-fashion-mnist when the IDX files are missing and this is possible."""
    if fashion_mnist_present(root):
        return root
    can_install = shutil.which("apt-get") is not None and hasattr(os, "geteuid") and os.geteuid() == 0
    if root == FASHION_MNIST_ROOT and can_install:
        print("Fashion-MNIST not found: installing it with apt-get (package dataset-fashion-mnist)", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"], check=False)
        if fashion_mnist_present(root):
            return root
    raise SystemExit(
        f"Fashion-MNIST IDX files are missing under {root}. Install them with "
        "`sudo apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu), or pass --fashion-mnist-root <folder "
        f"with {', '.join(FASHION_MNIST_FILES)} (optionally .gz)>."
    )


class Demo:
    def __init__(self, root: Path, fashion_mnist_root: Path, python: str = sys.executable) -> None:
        self.root = root.resolve()
        self.out = self.root / "outputs" / "demo"
        self.fashion_mnist_root = fashion_mnist_root
        self.python = python
        self.stage_seconds: dict[str, float] = {}
        self.env = {**os.environ, "BAR_ROOT": str(self.root), "BAR_PROGRESS": "0"}

    # ----------------------------------------------------------------- helpers
    def run(self, *args: str) -> None:
        print("+", " ".join(args), flush=True)
        subprocess.run([self.python, *args], cwd=self.root, env=self.env, check=True)

    def timed(self, name: str, function) -> Any:
        start = time.perf_counter()
        print(f"== stage {name}", flush=True)
        result = function()
        self.stage_seconds[name] = round(time.perf_counter() - start, 1)
        print(f"== stage {name} done in {self.stage_seconds[name]:.1f} s", flush=True)
        return result

    @property
    def tokenizer_ckpt(self) -> Path:
        return self.out / "tokenizer" / "checkpoints" / "last.ckpt"

    @property
    def generator_ckpt(self) -> Path:
        return self.out / "generator" / "checkpoints" / "last.ckpt"

    # ----------------------------------------------------------------- stages
    def data(self) -> None:
        ensure_fashion_mnist(self.fashion_mnist_root)
        shards = self.out / "shards"
        indexes = [shards / f"fmnist-{split}.index.json" for split in ("train", "test")]
        if (shards / "classes.json").is_file() and len(list(shards.glob("fmnist-t*.tar"))) == 18 and all(
            index.is_file() for index in indexes
        ):
            print("shards present, skipping conversion")
            return
        self.run("-m", "bar_lightning.data.convert", "fashion-mnist", "--root", str(self.fashion_mnist_root),
                 "--out", str(shards), "--size", "32", "--overwrite")

    def tokenizer(self) -> None:
        self.run("train.py", "experiment=demo_tokenizer", "trainer.enable_progress_bar=false",
                 "trainer.enable_model_summary=false")

    def pretokenize(self) -> None:
        self.run("pretokenize.py", f"tokenizer.checkpoint={self.tokenizer_ckpt}",
                 f"data.shards={self.out}/shards/fmnist-train.index.json",
                 f"output_dir={self.out}/tokens", "batch_size=500", "device=cpu",
                 f"hydra.run.dir={self.out}/logs/pretokenize")

    def generator(self) -> None:
        self.run("train.py", "experiment=demo_generator", "trainer.enable_progress_bar=false",
                 "trainer.enable_model_summary=false")

    def classifier(self) -> None:
        from bar_lightning.eval.demo_classifier import (
            load_fashion_mnist,
            save_classifier,
            train_demo_classifier,
        )

        path = self.out / "classifier" / "classifier.safetensors"
        if path.is_file():
            print("classifier present, skipping")
            return
        images, labels = load_fashion_mnist(str(self.fashion_mnist_root), split="train", size=32)
        model = train_demo_classifier(train_images=images, train_labels=labels, seed=0, device="cpu")
        save_classifier(model, path)

    def reference(self) -> Path:
        """Held-out real test images in ADM format: the reference set of `fid_demo`."""
        from bar_lightning.eval.demo_classifier import load_fashion_mnist
        from bar_lightning.eval.evaluate import to_uint8_images
        from bar_lightning.eval.metrics import save_adm_npz

        path = self.out / "reference_test.npz"
        if not path.is_file():
            images, _ = load_fashion_mnist(str(self.fashion_mnist_root), split="test", size=32)
            save_adm_npz(path, to_uint8_images(images))  # the samples' conversion
        return path

    def evaluate(self, samples_per_class: int = 100) -> dict[str, Any]:
        reference = self.reference()
        eval_dir = self.out / "eval"
        self.run("evaluate.py", f"generator.checkpoint={self.generator_ckpt}",
                 f"tokenizer.checkpoint={self.tokenizer_ckpt}", "sampling=demo",
                 f"num_samples_per_class={samples_per_class}", "batch_size=250", "device=cpu",
                 "metrics.feature_network=demo_classifier", "metrics.names=[class_accuracy,fid_demo]",
                 f"metrics.reference={reference}",
                 f"metrics.demo_classifier={self.out}/classifier/classifier.safetensors",
                 f"hydra.run.dir={eval_dir}")
        return json.loads((eval_dir / "metrics.json").read_text())

    def reconstruction_metrics(self) -> dict[str, float]:
        """The tokenizer on held-out images: PSNR, and the feature distance of reconstructions (rfid_demo)."""
        from bar_lightning.eval.demo_classifier import (
            classifier_metrics,
            features,
            load_classifier,
            load_fashion_mnist,
        )
        from bar_lightning.lightning.tokenizer_module import TokenizerModule

        images, labels = load_fashion_mnist(str(self.fashion_mnist_root), split="test", size=32)
        tokenizer = TokenizerModule.load_tokenizer(self.tokenizer_ckpt, use_ema=True)
        classifier = load_classifier(self.out / "classifier" / "classifier.safetensors").eval()
        with torch.no_grad():
            reconstructions = torch.cat([tokenizer(chunk).reconstruction.clamp(-1, 1) for chunk in images.split(500)])
        # Both sets go through the same uint8 quantisation as saved samples.
        real_q = quantize(images)
        recon_q = quantize(reconstructions)
        mse = (((real_q + 1) / 2 - (recon_q + 1) / 2) ** 2).flatten(1).mean(1)
        real_features = features(classifier, real_q, batch_size=500)
        real = classifier_metrics(classifier, real_q, labels=labels, batch_size=500)
        recon = classifier_metrics(classifier, recon_q, labels=labels, reference_features=real_features, batch_size=500)
        return {
            "real_class_accuracy": float(real["class_accuracy"]),
            "reconstruction_class_accuracy": float(recon["class_accuracy"]),
            "rfid_demo": float(recon["fid_demo"]),
            "tokenizer_psnr": float((-10 * torch.log10(mse.clamp_min(1e-10))).mean()),
        }

    def samples_grid(self, per_row: int = 10) -> Path:
        """A labelled grid of generated samples, one row per class."""
        from PIL import Image, ImageDraw

        with np.load(self.out / "eval" / "samples.npz", allow_pickle=False) as data:
            images = data["arr_0"]
        with np.load(self.out / "eval" / "samples_bits.npz", allow_pickle=False) as data:
            labels = data["labels"]
        size, scale, label_width = images.shape[1], 2, 110
        cell = size * scale + 2
        canvas = Image.new("RGB", (label_width + per_row * cell, 10 * cell), "white")
        draw = ImageDraw.Draw(canvas)
        for class_id in range(10):
            rows = np.flatnonzero(labels == class_id)[:per_row]
            draw.text((4, class_id * cell + cell // 2 - 6), CLASS_NAMES[class_id], fill="black")
            for column, index in enumerate(rows):
                tile = Image.fromarray(images[index]).resize((size * scale, size * scale), Image.NEAREST)
                canvas.paste(tile, (label_width + column * cell, class_id * cell))
        path = self.out / "samples.png"
        canvas.save(path)
        return path

    # ----------------------------------------------------------------- all
    def main(self) -> dict[str, Any]:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        start = time.perf_counter()
        self.timed("data", self.data)
        self.timed("tokenizer", self.tokenizer)
        self.timed("pretokenize", self.pretokenize)
        self.timed("generator", self.generator)
        self.timed("classifier", self.classifier)
        generation = self.timed("evaluate", self.evaluate)
        reconstruction = self.timed("reconstruction", self.reconstruction_metrics)
        self.samples_grid()
        metrics = {
            "class_accuracy": generation["class_accuracy"],
            "fid_demo": generation["fid_demo"],
            **reconstruction,
            "num_samples": generation["num_samples"],
            "guidance_scale": generation["guidance_scale"],
            "temperature": generation["temperature"],
            "tokens_allocation": generation["tokens_allocation"],
            "stage_seconds": self.stage_seconds,
            "total_seconds": round(time.perf_counter() - start, 1),
        }
        atomic_write_json(self.out / "metrics.json", metrics, indent=2)
        print(json.dumps(metrics, indent=2))
        return metrics


def quantize(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images to what a saved sample holds (evaluate.to_uint8_images) and back to [-1, 1]."""
    from bar_lightning.eval.evaluate import to_uint8_images, uint8_to_model_input

    return uint8_to_model_input(to_uint8_images(images))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="project folder (outputs go to <root>/outputs/demo)")
    parser.add_argument("--fashion-mnist-root", default=str(FASHION_MNIST_ROOT))
    args = parser.parse_args(argv)
    Demo(Path(args.root), Path(args.fashion_mnist_root)).main()


if __name__ == "__main__":
    main()
