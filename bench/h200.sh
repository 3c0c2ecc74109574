#!/usr/bin/env bash
# The H200 benchmark session, one device call per part; JSON and logs under $OUT.
#   bash bench/h200.sh sampling | training | graphs | strategies | final | memory | diagnose | tokenizer |
#                      official_tokenizer | side_by_side | official_compiled | half | evaluation_batches |
#                      training_side_by_side | after_move | tokenizer_compiled_side_by_side |
#                      after_move_and_ours | tokenizer_generator_same_call | tokenizer_gan_same_call |
#                      tokenizer_profile_same_call | tokenizer_gan_and_levers | evaluation_50k | tokenizer_memory |
#                      gpu_tests | gpu_tests_and_ours_profile LIMIT_S | evaluation_tests_and_ours_profile LIMIT_S |
#                      official_profile PHASE | tokenizer_cuda_graphs LIMIT_S |
#                      tokenizer_graphs_generator_same_call | tokenizer_graphs_gan_same_call | evaluation_peak_memory |
#                      sync_free_tests_and_ours LIMIT_S | default_generator_same_call | default_gan_same_call |
#                      sync_tests_and_ours_profile LIMIT_S | sync_tests LIMIT_S | ours_tokenizer_cache LIMIT_S |
#                      official_tokenizer_cache LIMIT_S | official_cache_then_ours LIMIT_S |
#                      tokenizer_same_call LIMIT_S | training_levers_same_call LIMIT_S |
#                      official_then_ours_same_call LIMIT_S | training_layout_same_call LIMIT_S |
#                      tokenizer_together LIMIT_S [generator|gan]
# Needs the wheels of ../shared/tools/device-wheels.sh in .whl (Hydra, webdataset, torch-fidelity); official_tokenizer
# also the official requirements (transformers 4.56.1, timm, accelerate and theirs) there and the official code
# exported to .upstream/bar (bench/official_tokenizer.py says how).
set -uo pipefail
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 BAR_PROGRESS=0 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
quiet() { grep -v -i -e warn -e "^ *return F" -e "^ *warnings" ; }
# Compile artifacts carried between machines (bench/compile_cache.py): every bench script loads the blobs of its code
# from the carried .compile_cache/ and, at its end, writes there the blob of its kind of run (code, phase, variants)
# if it compiled anything new; the blobs this call wrote come back under $OUT/compile_cache (put them into
# .compile_cache/ here with `python bench/compile_cache.py <folder>`).
ROOT=$PWD
mkdir -p "$ROOT/.compile_cache"
export BENCH_COMPILE_CACHE_IN=$ROOT/.compile_cache BENCH_COMPILE_CACHE_OUT=$ROOT/.compile_cache
touch /tmp/h200_call_start
return_compile_caches() {
  local rewritten
  rewritten=$(find "$ROOT/.compile_cache" -name '*.megacache.xz.[0-9]*' ! -name '*.tmp' -newer /tmp/h200_call_start)
  [ -z "$rewritten" ] && return
  mkdir -p "$OUT/compile_cache" && cp $rewritten "$OUT/compile_cache/"
  ls -l "$OUT/compile_cache"
}
trap return_compile_caches EXIT
# Every limit below ends in SIGKILL 10 s after its SIGTERM: Lightning's trainer catches SIGTERM and stops only at the
# end of its step; a run stopped mid-compilation (2026-12-07, item 12) ran past its limit to the call's, most likely so.
timeout() { command timeout -k 10 "$@"; }
# GPU test files under a time limit, the whole log kept in $OUT (a failure's traceback; pytest's log capture once
# filled the reply's tail), its last lines printed: gpu_tests_to_log LIMIT_S FILE...
gpu_tests_to_log() {
  local limit=$1; shift
  timeout "$limit" python3 -m pytest -q -p no:cacheprovider -p no:logging --tb=short "$@" > "$OUT/gpu_tests_full.log" 2>&1
  tail -6 "$OUT/gpu_tests_full.log" | tee "$OUT/gpu_tests.log"
  echo "tests done at ${SECONDS} s"
}
# One bench script run, its JSON in $OUT/NAME.json, under LIMIT_S, skipped when that is under MIN_S (a run that
# cannot reach its timed steps only spends device time); with --profile the printed tail holds the kernel table:
# bench_script MIN_S LIMIT_S NAME SCRIPT [ARGS...]
bench_script() {
  local min=$1 limit=$2 name=$3 script=$4 lines=4
  shift 4
  if [ "$limit" -lt "$min" ]; then echo "$name skipped: ${limit} s left"; return; fi
  [[ " $* " == *" --profile "* ]] && lines=32
  (cd "$ROOT/bench" && timeout "$limit" python3 "$script" "$@" --out "$OUT/$name.json" 2>&1 | quiet | tail -$lines)
  echo "$name done at ${SECONDS} s"
}
# One tokenizer phase of one code (ours: train.py's defaults, compiled with CUDA graphs on one GPU, unless ARGS name
# other `--variants`, which argparse takes over the first; the official compiled step), skipped under MIN_S seconds
# (default 40): [MIN_S=S] tokenizer_phase ours|official PHASE LIMIT_S NAME [ARGS...]
tokenizer_phase() {
  local code=$1 phase=$2 limit=$3 name=$4
  shift 4
  if [ "$code" = ours ]; then
    bench_script "${MIN_S:-40}" "$limit" "$name" tokenizer_training.py --phases "$phase" --variants default "$@"
  else
    bench_script "${MIN_S:-40}" "$limit" "$name" official_tokenizer.py --phase "$phase" "$@"
  fi
}
# The seconds left before the call's limit CALL_S, less a margin for the files to be written, and at most CAP_S when
# given: left_of CALL_S [CAP_S]
left_of() {
  local left=$((${1:-590} - 12 - SECONDS))
  [ -n "${2:-}" ] && [ "$2" -lt "$left" ] && left=$2
  echo "$left"
}
# One BAR-B training run of one code (ours: bench/training.py with VARIANT and further ARGS, batch 128; the official
# compiled step): training_run ours|official LIMIT_S NAME [VARIANT [ARGS...]]
training_run() {
  local code=$1 limit=$2 name=$3 variant=${4:-compile}
  shift 4 2>/dev/null || shift $#
  if [ "$code" = ours ]; then
    bench_script 40 "$limit" "$name" training.py --experiments bar_b --variants "$variant" "$@"
  else
    bench_script 40 "$limit" "$name" official_training.py --config bar_b
  fi
}
# Ours' compiled tokenizer generator phase with its kernel profile, in the seconds left of the call's limit CALL_S.
ours_generator_profile() {
  tokenizer_phase ours generator $((${1:-590} - 8 - SECONDS)) tokenizer_training_compile_generator_profile \
    --variants compile --profile
}
case "${1:-sampling}" in
  sampling)
    timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_sampling.py 2>&1 | tail -8 | tee "$OUT/gpu_tests.log"
    cd bench
    timeout 260 python3 sampling.py --experiment bar_b --variants graph+compile,graph+compile+bf16 \
      --profile --profile-variant graph+compile --out "$OUT/sampling_bar_b.json" 2>&1 | quiet | tail -40
    timeout 100 python3 sampling.py --experiment bar_b_patch2 --variants graph+compile,graph+compile+bf16 \
      --profile --profile-variant graph+compile --out "$OUT/sampling_bar_b_patch2.json" 2>&1 | quiet | tail -36
    timeout 70 python3 sampling.py --experiment bar_b_patch4 --variants graph+compile,graph+compile+bf16 \
      --out "$OUT/sampling_bar_b_patch4.json" 2>&1 | quiet | tail -5
    ;;
  training)
    # The default compiled BAR-B step (CUDA graphs on one GPU) with a kernel profile, then one lever each: the
    # unpadded MBM-head MLP (the default pads it to aligned matrix products) and Inductor's C++ wrapper (no CUDA
    # graphs: compare with compile+no_cuda_graphs). A cold BAR-B compilation takes ~100 s.
    cd bench
    timeout 200 python3 training.py --experiments bar_b --variants compile --profile \
      --out "$OUT/training_bar_b.json" 2>&1 | quiet | tail -32
    for variant in compile+unaligned_head compile+cpp_wrapper; do
      timeout 195 python3 training.py --experiments bar_b --variants $variant \
        --out "$OUT/training_bar_b_$variant.json" 2>&1 | quiet | tail -3
    done
    ;;
  graphs)
    # CUDA graphs with Inductor's coordinate-descent tuning of the step's Triton kernels: its compilation took more
    # than 300 s on a cold machine, so it gets the whole call.
    cd bench
    timeout 560 python3 training.py --experiments bar_b --variants compile+cuda_graphs+coordinate_descent \
      --out "$OUT/training_bar_b_cuda_graphs_cd.json" 2>&1 | quiet | tail -3
    ;;
  strategies)
    # Eager, activation checkpointing and the distributed strategies on one GPU, then train.py itself under FSDP.
    cd bench
    timeout 330 python3 training.py --experiments bar_b --variants eager,fsdp,ddp,compile+checkpoint \
      --out "$OUT/training_bar_b_strategies.json" 2>&1 | quiet | tail -8
    timeout 60 python3 training.py --experiments bar_b_patch4 --variants eager \
      --out "$OUT/training_bar_b_patch4_eager.json" 2>&1 | quiet | tail -4
    cd ..
    # Issue 7: the FSDP path of train.py itself on one GPU (one process), full-size BAR-B, synthetic tokens;
    # nvidia-smi samples the device memory in use meanwhile (reserved memory plus the CUDA context).
    nvidia-smi --query-gpu=memory.used --format=csv,noheader -lms 500 > "$OUT/fsdp_memory_used.csv" &
    SMI=$!
    timeout 100 python3 train.py experiment=bar_b trainer=fsdp trainer.devices=1 data=synthetic_tokens data.num_workers=4 \
      trainer.max_steps=20 trainer.log_every_n_steps=5 trainer.enable_progress_bar=false logger=csv \
      hydra.run.dir=/tmp/fsdp_run 2>&1 | quiet | tail -5
    kill $SMI
    sort -n "$OUT/fsdp_memory_used.csv" | tail -1
    cp /tmp/fsdp_run/*/metrics.csv "$OUT/fsdp_metrics.csv" 2>/dev/null || find /tmp/fsdp_run -name metrics.csv -exec cp {} "$OUT/fsdp_metrics.csv" \;
    ;;
  final)
    # GPU tests (CUDA-graph training step vs compiled vs eager; the sampling fast path vs the reference and the
    # fixtures), then train.py's default BAR-B path on one GPU (compiled, CUDA graphs) for 25 steps.
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_training.py 2>&1 | tail -6 | tee "$OUT/gpu_training_tests.log"
    timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_sampling.py 2>&1 | tail -6 | tee "$OUT/gpu_tests.log"
    timeout 125 python3 train.py experiment=bar_b data=synthetic_tokens data.num_workers=4 trainer.max_steps=25 \
      trainer.log_every_n_steps=5 trainer.enable_progress_bar=false logger=csv hydra.run.dir=/tmp/default_run 2>&1 | quiet | tail -4
    find /tmp/default_run -name metrics.csv -exec cp {} "$OUT/default_run_metrics.csv" \; -exec cat {} \;
    ;;
  memory)
    cd bench && python3 head_memory.py --out "$OUT/head_memory.json" 2>&1 | quiet | tail -15
    ;;
  diagnose)
    cd bench && python3 decode_kernels.py --profile --out "$OUT/decode_kernels.json" 2>&1 | quiet
    ;;
  tokenizer)
    # A plain train.py (BAR-B) on the GPU: data.num_workers=auto from the machine's cores, no CPU refusal.
    timeout 150 python3 train.py data=synthetic_tokens data.num_workers=auto trainer.max_steps=2 training.compile=false \
      logger=none callbacks=none print_config=false hydra.run.dir=/tmp/plain_run 2>&1 | grep -E "num_workers=auto|Error|Output dir" | tail -4
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_tokenizer.py tests/test_run_conveniences.py 2>&1 | tail -8 | tee "$OUT/gpu_tokenizer_tests.log"
    cd bench
    timeout 420 python3 tokenizer_training.py --phases generator,gan --variants eager,compile \
      --out "$OUT/tokenizer_training.json" 2>&1 | quiet | tail -12
    ;;
  side_by_side)
    # Issue 16 call A: ours (eager, both phases) and the official step eager (both phases) on the same card, then
    # ours compiled (generator phase). Inner limits add up to 550 s.
    cd bench
    timeout 100 python3 tokenizer_training.py --phases generator,gan --variants eager \
      --out "$OUT/tokenizer_training_eager.json" 2>&1 | quiet | tail -6
    for phase in generator gan; do
      timeout 110 python3 official_tokenizer.py --phase $phase --eager --out "$OUT/official_tokenizer_eager_$phase.json" \
        2>&1 | quiet | tail -3
    done
    timeout 230 python3 tokenizer_training.py --phases generator --variants compile \
      --out "$OUT/tokenizer_training_compile.json" 2>&1 | quiet | tail -4
    ;;
  official_compiled)
    # Issue 16 call A: the official tokenizer step as its recipe runs it (compile_model: true) on a cold compile
    # cache, generator phase, then the G/D phase with the time left; what it compiles stays in
    # $TORCHINDUCTOR_CACHE_DIR for call B on the same warm machine.
    cd bench
    timeout 470 python3 official_tokenizer.py --phase generator --out "$OUT/official_tokenizer_compiled_generator.json" \
      2>&1 | quiet | tail -3
    echo "official generator phase done at ${SECONDS} s"
    left=$((580 - SECONDS))
    [ $left -gt 40 ] && timeout $left python3 official_tokenizer.py --phase gan \
      --out "$OUT/official_tokenizer_compiled_gan.json" 2>&1 | quiet | tail -3
    echo "official G/D phase done at ${SECONDS} s"
    ;;
  tokenizer_compiled_side_by_side)
    # Issue 16 call B, after call A on the same warm machine: the official compiled step again (warm compile cache,
    # ~150 s) and ours compiled (the default; ~190 s on a cold cache) in one call, generator phase, then the G/D
    # phase of ours with the time left (both phases in one process need ~330 s, more than the call leaves).
    cd bench
    timeout 200 python3 official_tokenizer.py --phase generator --out "$OUT/official_tokenizer_compiled_generator_2.json" \
      2>&1 | quiet | tail -2
    timeout 300 python3 tokenizer_training.py --phases generator --variants compile \
      --out "$OUT/tokenizer_training_compile_generator.json" 2>&1 | quiet | tail -3
    left=$((585 - SECONDS))
    [ $left -gt 60 ] && timeout $left python3 tokenizer_training.py --phases gan --variants compile \
      --out "$OUT/tokenizer_training_compile_gan.json" 2>&1 | quiet | tail -3
    echo "side by side done at ${SECONDS} s"
    ;;
  half)
    # Issue 16 call C: the tokenizer GPU tests, time to FID (evaluate.py, BAR-B fp32, 5,000 samples, every metric),
    # pretokenization from JPEG shards against the encoder alone. Inner limits add up to 560 s.
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_tokenizer.py 2>&1 | tail -6 | tee "$OUT/gpu_tokenizer_tests.log"
    cd bench
    timeout 230 python3 evaluation.py --per-class 5 --out "$OUT/evaluation_bar_b_fp32.json" 2>&1 | quiet | tail -6
    timeout 180 python3 pretokenize.py --images 2000 --batch 64 --variants center:auto,ten_crop:auto \
      --out "$OUT/pretokenize.json" 2>&1 | quiet | tail -12
    ;;
  evaluation_batches)
    # Issue 16 item 4: time to FID-50k at larger sampling batches (the first batch, with the compilation, timed on
    # its own), the statistics stage timed at 50,000 samples, and bf16. Inner limits add up to 570 s.
    cd bench
    timeout 230 python3 evaluation.py --per-class 5 --batch 500 --statistics-samples 50000 \
      --out "$OUT/evaluation_bar_b_fp32_batch500.json" 2>&1 | quiet | tail -5
    timeout 170 python3 evaluation.py --per-class 5 --batch 250 --out "$OUT/evaluation_bar_b_fp32_batch250.json" \
      2>&1 | quiet | tail -5
    timeout 170 python3 evaluation.py --per-class 5 --batch 500 --precision bf16 \
      --out "$OUT/evaluation_bar_b_bf16_batch500.json" 2>&1 | quiet | tail -5
    ;;
  training_side_by_side)
    # Issue 16 item 6: the default BAR-B step (compiled, CUDA graphs, no host read per step) with its profile, the
    # official compiled step (bench/official_training.py) in the same call, ours again (warm compile cache) for the
    # spread, then Inductor's C++ wrapper if the call has time left. Inner limits add up to 570 s.
    cd bench
    timeout 190 python3 training.py --experiments bar_b --variants compile --profile \
      --out "$OUT/training_bar_b.json" 2>&1 | quiet | tail -30
    timeout 190 python3 official_training.py --config bar_b --out "$OUT/official_training_bar_b.json" 2>&1 | quiet | tail -2
    timeout 110 python3 training.py --experiments bar_b --variants compile \
      --out "$OUT/training_bar_b_again.json" 2>&1 | quiet | tail -3
    ;;
  after_move)
    # Issue 18: every GPU test after the restructuring (sampler apart from the network, retired decode variants,
    # the non-finite-loss callback, defaults in the YAML). Inner limits add up to 540 s.
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_sampling.py 2>&1 | tail -6 | tee "$OUT/gpu_sampling_tests.log"
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_training.py tests/test_non_finite_loss.py 2>&1 \
      | tail -6 | tee "$OUT/gpu_training_tests.log"
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_tokenizer.py 2>&1 | tail -6 | tee "$OUT/gpu_tokenizer_tests.log"
    ;;
  after_move_and_ours)
    # The GPU tests (as after_move), then ours compiled (the tokenizer default), generator phase, with the time the
    # call has left.
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_sampling.py 2>&1 | tail -3 | tee "$OUT/gpu_sampling_tests.log"
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_training.py tests/test_non_finite_loss.py 2>&1 \
      | tail -3 | tee "$OUT/gpu_training_tests.log"
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_tokenizer.py 2>&1 | tail -3 | tee "$OUT/gpu_tokenizer_tests.log"
    echo "tests done at ${SECONDS} s"
    cd bench
    left=$((400 - SECONDS))
    [ $left -gt 60 ] && timeout $left python3 tokenizer_training.py --phases generator --variants compile \
      --out "$OUT/tokenizer_training_compile_generator.json" 2>&1 | quiet | tail -3
    ;;
  tokenizer_generator_same_call)
    # Issue 16 item 1, the same-call ratio (fresh machine, cold compile cache for both codes): the official compiled
    # generator phase (~365 s cold), then ours compiled (the default, ~175 s cold) with the time left.
    tokenizer_phase official generator 410 official_tokenizer_compiled_generator_3
    tokenizer_phase ours generator "$(left_of 604)" tokenizer_training_compile_generator_3 --variants compile
    ;;
  tokenizer_gan_same_call)
    # Issue 16 item 1, G/D phase, after tokenizer_generator_same_call on the same warm machine (the autoencoder
    # graphs of both codes cached): ours compiled first (its first steps took 60 s after the generator phase), then
    # the official compiled G/D phase with all the time left (it did not reach a timed step in 125 s).
    tokenizer_phase ours gan 200 tokenizer_training_compile_gan_3 --variants compile
    tokenizer_phase official gan "$(left_of 604)" official_tokenizer_compiled_gan_3
    ;;
  tokenizer_profile_same_call)
    # Issue 16 item 1 again, now that bench/tokenizer_training.py sets the config's float32 matmul precision (TF32,
    # as train.py; before, ours ran its float32 regions without TF32 while the official enabled it), with a kernel
    # profile of two batches after the timed ones for each code. Fresh machine, cold compile caches: the official
    # generator phase (~240 s), then ours (~175 s). First the tokenizer GPU tests (~80 s): the G and D steps now hand
    # their losses to the non-finite-loss callback (the fused AdamW's found_inf, no host read per step).
    timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_tokenizer.py 2>&1 | tail -3 | tee "$OUT/gpu_tokenizer_tests.log"
    tokenizer_phase official generator 330 official_tokenizer_compiled_generator_profile --profile
    tokenizer_phase ours generator "$(left_of 604)" tokenizer_training_compile_generator_profile --variants compile --profile
    ;;
  tokenizer_gan_and_levers)
    # After tokenizer_profile_same_call on the same warm machine: ours G/D phase with its profile, then with the
    # discriminator compiled too (training.compile_discriminator, as the official recipe compiles it), ours generator
    # phase with cuDNN's autotuner (trainer.benchmark=true, as the official recipe), then the official G/D phase with
    # its profile and the time left (~170 s on a warm cache).
    cd bench
    timeout 150 python3 tokenizer_training.py --phases gan --variants compile --profile \
      --out "$OUT/tokenizer_training_compile_gan_profile.json" 2>&1 | quiet | tail -30
    timeout 120 python3 tokenizer_training.py --phases gan --variants compile+discriminator \
      --out "$OUT/tokenizer_training_compile_discriminator_gan.json" 2>&1 | quiet | tail -2
    timeout 100 python3 tokenizer_training.py --phases generator --variants compile+cudnn_benchmark \
      --out "$OUT/tokenizer_training_compile_cudnn_benchmark.json" 2>&1 | quiet | tail -2
    echo "ours done at ${SECONDS} s"
    left=$((592 - SECONDS))
    timeout $left python3 official_tokenizer.py --phase gan --profile --out "$OUT/official_tokenizer_compiled_gan_profile.json" \
      2>&1 | quiet | tail -30
    echo "official G/D phase done at ${SECONDS} s"
    ;;
  gpu_tests)
    # evaluate.py's decoding overlapped with sampling (overlap_decoding=true: images, bits and metrics equal to the
    # serial order's), before evaluation_50k turns it on; the tokenizer's GPU tests run in tokenizer_profile_same_call.
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_evaluation.py 2>&1 | tail -6 | tee "$OUT/gpu_tests.log"
    ;;
  gpu_tests_and_ours_profile)
    # Both GPU test files of issue 16 (82 + 71 s in separate runs on 2026-12-07; a failure's traceback in
    # gpu_tests_full.log, without the log capture that filled the tail that day), then ours' compiled generator phase
    # with its kernel profile in the seconds left of ${2} (the call's limit; ~200 s from a cold compile cache),
    # without the official step beside it (official_profile, its own call).
    gpu_tests_to_log 190 tests/test_gpu_tokenizer.py tests/test_gpu_evaluation.py
    ours_generator_profile "${2:-590}"
    ;;
  evaluation_tests_and_ours_profile)
    # tests/test_gpu_evaluation.py alone (the code it covers changed after its last GPU run; the tokenizer's code did
    # not since tests/test_gpu_tokenizer.py passed on 2026-12-07), then ours' compiled generator phase with its kernel
    # profile in the seconds left of ${2} (the call's limit): ~100 s less than gpu_tests_and_ours_profile, for a
    # session whose failed starts left too little for that and official_profile both.
    gpu_tests_to_log 110 tests/test_gpu_evaluation.py
    ours_generator_profile "${2:-590}"
    ;;
  tokenizer_cuda_graphs)
    # The tokenizer's GPU tests (the CUDA-graph test among them: training.compile_mode=reduce-overhead; on 2026-12-07
    # it found gradients kept past their step, released since), then ours' generator phase compiled with CUDA graphs
    # and with the default compile mode (fresh machine, cold compile cache: 126 s of tests, then 171 + 140 s of
    # first steps and ~100 s of timed ones on 2026-12-07).
    gpu_tests_to_log 200 tests/test_gpu_tokenizer.py
    cd bench
    timeout $((${2:-590} - 8 - SECONDS)) python3 tokenizer_training.py --phases generator \
      --variants compile+cuda_graphs,compile --out "$OUT/tokenizer_training_cuda_graphs_generator.json" 2>&1 | quiet | tail -4
    echo "ours done at ${SECONDS} s"
    ;;
  tokenizer_graphs_generator_same_call)
    # After tokenizer_cuda_graphs on the same warm machine (ours' graphs cached): the official compiled generator
    # phase (cold cache for it, ~280 s), then ours with CUDA graphs (~75 s warm), one call (2026-12-07: 354 s).
    tokenizer_phase official generator 400 official_tokenizer_compiled_generator_graphs_call
    tokenizer_phase ours generator "$(left_of 597)" tokenizer_training_cuda_graphs_generator_same_call \
      --variants compile+cuda_graphs
    ;;
  tokenizer_graphs_gan_same_call)
    # After tokenizer_graphs_generator_same_call (autoencoder graphs of both codes cached): ours' G/D phase with CUDA
    # graphs (~130 s), then the official compiled G/D phase (~205 s), one call (2026-12-07: 337 s).
    tokenizer_phase ours gan 210 tokenizer_training_cuda_graphs_gan_same_call --variants compile+cuda_graphs
    tokenizer_phase official gan "$(left_of 597)" official_tokenizer_compiled_gan_graphs_call
    ;;
  sync_free_tests_and_ours)
    # The steps without a host-device wait (host numbers logged as device tensors, the EMA's count read from the
    # device once, the bar's metrics read at most every second) and the bench timed by stream events instead of a
    # synchronisation per step. The GPU tests of both modules (their steady-state steps under
    # torch.cuda.set_sync_debug_mode("error"); the compile-mode rule of 1d5ec7f), then ours' generator phase as
    # train.py runs it by default (compiled, CUDA graphs on one GPU; ~215 s from a cold cache) in the seconds left
    # of ${2} (the call's limit).
    gpu_tests_to_log 330 tests/test_gpu_tokenizer.py tests/test_gpu_training.py
    cd bench
    timeout $((${2:-590} - 8 - SECONDS)) python3 tokenizer_training.py --phases generator --variants default \
      --out "$OUT/tokenizer_training_default_generator.json" 2>&1 | quiet | tail -3
    echo "ours generator phase done at ${SECONDS} s"
    ;;
  sync_tests_and_ours_profile)
    # The four steady-state tests of sync_free_tests_and_ours alone (on 2026-12-07 they found Lightning reading every
    # prog_bar value after each step; the modules log none since), then ours' default generator phase with its
    # kernel profile (~270 s from a cold cache) and its G/D phase in the seconds left of ${2} (the call's limit), no
    # official beside them.
    gpu_tests_to_log 200 -k never_wait tests/test_gpu_tokenizer.py tests/test_gpu_training.py
    cd bench
    timeout $((${2:-590} - 8 - SECONDS)) python3 tokenizer_training.py --phases generator --variants default --profile \
      --out "$OUT/tokenizer_training_default_generator_profile.json" 2>&1 | quiet | tail -32
    echo "ours generator phase done at ${SECONDS} s"
    # Then ours' default G/D phase (autoencoder graphs cached, ~70-130 s) if the call has the time.
    left=$((${2:-590} - 8 - SECONDS))
    [ $left -gt 60 ] && timeout $left python3 tokenizer_training.py --phases gan --variants default \
      --out "$OUT/tokenizer_training_default_gan.json" 2>&1 | quiet | tail -3
    echo "ours G/D phase done at ${SECONDS} s"
    ;;
  sync_tests)
    # The four steady-state tests alone, under the limit ${2}: for a session whose failed starts left no time for
    # ours' full-size step beside them.
    gpu_tests_to_log "${2:-150}" -k never_wait tests/test_gpu_tokenizer.py tests/test_gpu_training.py
    ;;
  default_generator_same_call)
    # After sync_free_tests_and_ours on the same warm machine (ours' graphs cached, ~75 s; up to ~250 s if that call's
    # limit cut ours' compilation short): ours' default generator phase with its kernel profile of two steps after
    # the timed ones, then the official compiled generator phase with the time left (cold cache for it: 240-354 s to
    # its first timed step on 2026-12-07), one call, both timed by stream events.
    tokenizer_phase ours generator 250 tokenizer_training_default_generator_same_call --profile
    tokenizer_phase official generator "$(left_of 600)" official_tokenizer_compiled_generator_events
    ;;
  default_gan_same_call)
    # After default_generator_same_call (autoencoder graphs of both codes cached): ours' default G/D phase (~130 s),
    # then the official compiled G/D phase (~205 s), one call, both timed by stream events.
    tokenizer_phase ours gan 230 tokenizer_training_default_gan_same_call
    tokenizer_phase official gan "$(left_of 600)" official_tokenizer_compiled_gan_events
    ;;
  ours_tokenizer_cache)
    # A fresh machine (and no carried blob of ours): ours' default generator phase from a cold cache (215 to more than
    # 340 s on 2026-12-07), then its G/D phase (the discriminator's graphs on top), in the call's limit ${2}. Both
    # write ours' compile blob; the call returns it.
    tokenizer_phase ours generator "$(left_of "${2:-590}")" ours_tokenizer_generator_cold
    tokenizer_phase ours gan "$(left_of "${2:-590}")" ours_tokenizer_gan_cold
    ;;
  official_tokenizer_cache)
    # The same for the official compiled step (a cold generator phase ran past 457 s on 2026-12-07's seventh session).
    tokenizer_phase official generator "$(left_of "${2:-590}")" official_tokenizer_generator_cold
    tokenizer_phase official gan "$(left_of "${2:-590}")" official_tokenizer_gan_cold
    ;;
  official_cache_then_ours)
    # For a session with time for two calls only: the official generator phase from a cold cache (354 to more than
    # 457 s on 2026-12-07; it writes the official blob), then ours' generator phase with the time left (ours' graphs
    # cached by ours_tokenizer_cache on the same machine or a carried blob: ~130 s), so that the generator phase has
    # a same-call ratio; the call's limit is ${2}.
    tokenizer_phase official generator "$(left_of "${2:-590}")" official_tokenizer_generator_cold
    # (skipped under 120 s: ours' process alone, with its graphs cached, took more than the 120 s of 2026-12-07's
    # item 18)
    MIN_S=120 tokenizer_phase ours generator "$(left_of "${2:-590}")" ours_tokenizer_generator_after_official
    ;;
  official_then_ours_same_call)
    # The call after official_cache_then_ours on the same warm machine, for a session that starts with no carried blob
    # (the official generator graphs cached there by the first call; ours' as far as its compilation got): the
    # official generator phase (capped at 200 s), then ours' with up to 400 s of the rest, so that the generator phase
    # has a same-call ratio even if the first call's was cut off; then both G/D phases only if 330 s are left for the
    # pair (one without the other gives no ratio); the call's limit is ${2}. Superseded by tokenizer_together: on
    # 2026-12-08 (an H100, a 470-s call) the official phase ran past its 200-s cap with its graphs cached on the
    # machine, and ours, half compiled by the call before, did not reach its timed steps in the 249 s left.
    tokenizer_phase official generator "$(left_of "${2:-590}" 200)" official_tokenizer_generator_same_call
    tokenizer_phase ours generator "$(left_of "${2:-590}" 400)" ours_tokenizer_generator_same_call
    if [ "$(left_of "${2:-590}")" -ge 330 ]; then
      tokenizer_phase ours gan "$(left_of "${2:-590}" 150)" ours_tokenizer_gan_same_call
      tokenizer_phase official gan "$(left_of "${2:-590}")" official_tokenizer_gan_same_call
    else
      echo "G/D phases skipped: $(left_of "${2:-590}") s left"
    fi
    ;;
  tokenizer_together)
    # Both codes' tokenizer phase ${3:-generator} in one call from cold caches (a session without blobs), the call's
    # limit ${2}. Where both fit on the card at once, the two processes start together, compile side by side and
    # take turns at their timed steps (bench/turns.py: no timed step runs beside the other process's work; a
    # process still compiling 90 s before the call's end no longer holds the other back, and its row says so):
    # on an H200 in either phase; on an 80-GiB card in the generator phase only (peaks 34.74 + 38.75 GiB; the G/D
    # phase's 39.38 + 43.31 do not fit), with expandable allocator segments against fragmentation (it changes where
    # the allocator maps memory, not the steps; the rows record it). Otherwise one after the other, the official
    # code first. On 2026-12-08 the official generator phase took 311 s to its timed steps cold and more than 200 s
    # with its compile blob; ours did not finish compiling in 204 s, nor in 249 s more: one after the other, neither
    # fits beside the other cold.
    phase=${3:-generator}
    card_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
    if [ "$card_mib" -ge 120000 ] || { [ "$phase" = generator ] && [ "$card_mib" -ge 79000 ]; }; then
      [ "$card_mib" -lt 120000 ] && export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
      rm -rf /tmp/bench_turns && mkdir -p /tmp/bench_turns
      limit=$(left_of "${2:-590}")
      export BENCH_TURNS_DIR=/tmp/bench_turns BENCH_TURNS_PARTIES=2 BENCH_TURNS_DEADLINE=$(($(date +%s) + limit - 90))
      tokenizer_phase official "$phase" "$limit" "official_tokenizer_${phase}_together" &
      tokenizer_phase ours "$phase" "$limit" "ours_tokenizer_${phase}_together" &
      wait
      unset BENCH_TURNS_DIR BENCH_TURNS_PARTIES BENCH_TURNS_DEADLINE PYTORCH_CUDA_ALLOC_CONF
    else
      echo "a card of ${card_mib} MiB, phase ${phase}: the two codes one after the other"
      tokenizer_phase official "$phase" "$(left_of "${2:-590}")" "official_tokenizer_${phase}_cold"
      MIN_S=120 tokenizer_phase ours "$phase" "$(left_of "${2:-590}")" "ours_tokenizer_${phase}_after_official"
    fi
    # The tokenizer's GPU tests in the time left (the model code changed since they last ran: ab8cbff).
    if [ "$(left_of "${2:-590}")" -ge 100 ]; then
      gpu_tests_to_log "$(left_of "${2:-590}")" tests/test_gpu_tokenizer.py
    else
      echo "tokenizer GPU tests skipped: $(left_of "${2:-590}") s left"
    fi
    ;;
  tokenizer_same_call)
    # Both codes, both phases, in one call, once both codes' graphs are cached (carried blobs, or the two parts above
    # on the same machine): the same-call ratios of the steps that no longer wait for the GPU (docs/benchmarks.md 5i).
    # The limits keep a slow first phase from taking the others' time; ${2} is the call's limit.
    tokenizer_phase ours generator "$(left_of "${2:-590}" 150)" ours_tokenizer_generator_same_call
    tokenizer_phase official generator "$(left_of "${2:-590}" 170)" official_tokenizer_generator_same_call
    tokenizer_phase ours gan "$(left_of "${2:-590}" 150)" ours_tokenizer_gan_same_call
    tokenizer_phase official gan "$(left_of "${2:-590}")" official_tokenizer_gan_same_call
    ;;
  training_layout_same_call)
    # The position-major attention inputs (models/bar_blocks.py, 2026-12-07, ninth session) against the tree before
    # them, exported to .baseline/src (`git archive <commit> src | tar -x -C .baseline`, carried), in one call from
    # cold caches: ours' default step on this tree with its profile (and its costliest Triton kernels' source), the
    # official compiled step, ours' default step on the earlier tree; then the GPU tests of the changed code with
    # the time left of the call's limit ${2}. (Ours' first run gets 240 s: cold, its profiled steps after the timed
    # ones ran past 150 s on 2026-12-07, item 21, and lost its row.)
    training_run ours "$(left_of "${2:-590}" 240)" training_bar_b_position_major compile --profile
    training_run official "$(left_of "${2:-590}" 180)" official_training_bar_b_layout_call
    PYTHONPATH=/tmp/site:$ROOT/.baseline/src training_run ours "$(left_of "${2:-590}" 140)" training_bar_b_head_major \
      compile
    gpu_tests_to_log "$(left_of "${2:-590}")" tests/test_gpu_training.py tests/test_gpu_sampling.py
    ;;
  training_levers_same_call)
    # Issue 16 item 6 with the carried blobs of training_side_by_side (2026-12-07, eighth session, written on an
    # H100: ours' first steps 13.8 s with its blob, against 95.5 s cold; the official's 142.4 s cold): ours' default
    # step and the official compiled step (their limits leave room for a cold compilation, on an H200 or if a blob
    # fails), then the levers in the same call, each in its own process and from a cold cache: coordinate-descent
    # tuning with CUDA graphs (301.5 s to its first timed step on 2026-12-06) and Inductor's C++ wrapper (without
    # graphs: compare with compile+no_cuda_graphs), with the time left of the call's limit ${2}. The default step's
    # profile keeps the source of its costliest Triton kernels (5l: the largest is the adaLN gradient assembly).
    training_run ours "$(left_of "${2:-590}" 150)" training_bar_b_default_levers_call compile --profile
    training_run official "$(left_of "${2:-590}" 180)" official_training_bar_b_levers_call
    training_run ours "$(left_of "${2:-590}" 380)" training_bar_b_cuda_graphs_coordinate_descent \
      compile+cuda_graphs+coordinate_descent
    training_run ours "$(left_of "${2:-590}" 150)" training_bar_b_no_cuda_graphs compile+no_cuda_graphs
    training_run ours "$(left_of "${2:-590}")" training_bar_b_cpp_wrapper compile+cpp_wrapper
    ;;
  evaluation_50k)
    # Issue 16 item 4 for real: evaluate.py over 50,000 samples (BAR-B fp32, batch 500, every metric), a progress
    # line every 30 s so a run cut off at the limit says how far it got. All the call's time left after the set-up
    # above goes to it (the 5,000-sample run extrapolates to ~555 s of run_evaluation; the real one had run ~570 s
    # when it was cut off, before the bits file was written quicker), plus the script's ~13 s of imports and set-up.
    # Since then decoding, Inception features and host copies overlap the next batch's sampling (a second CUDA
    # stream); its GPU test is part gpu_tests, the call before this one.
    cd bench
    timeout $((595 - SECONDS)) python3 evaluation.py --per-class 50 --batch 500 --evaluate-override overlap_decoding=true \
      --out "$OUT/evaluation_bar_b_fp32_batch500_50k.json" \
      2>&1 | quiet | tail -30
    echo "evaluation done at ${SECONDS} s"
    ;;
  official_profile)
    # The official tokenizer step compiled, phase ${2} (generator or gan), with its kernel profile, alone in a call:
    # in tokenizer_profile_same_call (2026-12-07) its cold compilation plus the profiled batches ran past 330 s and
    # left ours too little time. The same-call ratio is measured without --profile (tokenizer_generator_same_call).
    cd bench
    timeout $((${OFFICIAL_LIMIT_S:-590} - SECONDS)) python3 official_tokenizer.py --phase "${2:-generator}" --profile \
      --out "$OUT/official_tokenizer_compiled_${2:-generator}_profile.json" 2>&1 | quiet | tail -30
    echo "official ${2:-generator} phase done at ${SECONDS} s"
    ;;
  tokenizer_memory)
    # The eager tokenizer steps' memory gap (ours 42.84 against the official 41.16 GiB, generator phase): the CUDA
    # allocator history of two steps after the timed ones, replayed to what is alive at the peak (bench/memory_snapshot.py).
    cd bench
    timeout 120 python3 tokenizer_training.py --phases generator,gan --variants eager --memory-snapshot \
      --out "$OUT/tokenizer_training_eager_memory.json" 2>&1 | quiet | tail -50
    for phase in generator gan; do
      timeout 100 python3 official_tokenizer.py --phase $phase --eager --memory-snapshot \
        --out "$OUT/official_tokenizer_eager_${phase}_memory.json" 2>&1 | quiet | tail -25
    done
    ;;
  evaluation_peak_memory)
    # Plan item 3: evaluate.py's peak device memory (BAR-B fp32 with the BAR-FSQ decoder, batch 500, 5,000 samples,
    # every metric) with overlap_decoding (the default) and without it (2026-12-06: ~90 s a run after ~30 s of imports).
    cd bench
    for overlap in true false; do
      timeout 170 python3 evaluation.py --per-class 5 --batch 500 --evaluate-override overlap_decoding=$overlap \
        --out "$OUT/evaluation_peak_memory_overlap_$overlap.json" 2>&1 | quiet | tail -3
      python3 -c "import json, sys; row = json.load(open(sys.argv[1]))['rows'][0]; print(sys.argv[2], {k: row[k] for k in ('wall_s', 'peak_allocated_gib', 'peak_reserved_gib')})" \
        "$OUT/evaluation_peak_memory_overlap_$overlap.json" "overlap_decoding=$overlap"
    done
    ;;
  official_tokenizer)
    # The official tokenizer step (its compile_model: true), both phases, on the same card.
    cd bench
    for phase in generator gan; do
      timeout 280 python3 official_tokenizer.py --phase $phase --out "$OUT/official_tokenizer_$phase.json" 2>&1 | quiet | tail -3
    done
    ;;
esac
