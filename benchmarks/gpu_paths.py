#!/usr/bin/env python
"""The code paths only a GPU runs, each for a few steps, with PASS / FAIL / SKIP per path: what the first minutes of
a GPU lease should find before any benchmark (benchmarks/gpu_session.sh runs it first).

    python benchmarks/gpu_paths.py --dataset_path data/cifar10                  # on the GPU machine
    python benchmarks/gpu_paths.py --dataset_path ../shared/data/cifar10 --device cpu   # the script itself, on a CPU

Paths (CIFAR-10 subsets, ResNet-18; each check is a real command line, as a user types it):
  bf16_supervised   train_supervised.py --mixed_precision bf16 --memory_format channels_last, then evaluate.py on
                    it (probe, kNN, adaptive retrieval timed on the device)
  fp16_ssl          train_ssl.py --mixed_precision fp16 --gpu_augment (the grad scaler; augmentation on the device)
  data_on_device    train_ssl.py --data_on_device (decode once, batches and augmentation on the device), resumed from
                    a mid-epoch checkpoint after SIGTERM
  compile           ACCELERATE_DYNAMO_BACKEND=inductor train_supervised.py: the saved keys are bare, and
                    MatryoshkaEncoder.from_pretrained loads the folder on the device and encodes
  embed             embed.py on the test split with a faiss index, then a --query search: every embedding left the
                    device, the query finds itself
  sync_bn           (2+ GPUs) train_ssl.py --method byol --sync_bn on 2 processes under mrl.train.supervise
  compile_2proc     (2+ GPUs) 2 compiled processes under mrl.train.supervise + torchrun, SIGTERM at the first checkpoint
                    (exit 75), resumed to the end; the saved keys are bare
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PY = sys.executable


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", required=True, help="the CIFAR-10 copy (Hub parquet layout)")
    parser.add_argument("--work", default="/tmp/gpu_paths", help="where the runs go")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: check this script on a CPU (fp32, aot_eager instead of inductor, tiny sizes, 2 "
                             "CPU processes for the 2-GPU paths but --sync_bn)")
    parser.add_argument("--timeout", type=int, default=150, help="seconds per command")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    gpu = args.device == "cuda"
    import torch

    gpus = torch.cuda.device_count() if gpu else 0
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if not gpu:
        env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="1")
    size = 512 if gpu else 64
    data = ["--dataset", "cifar10", "--dataset_path", args.dataset_path, "--max_train_samples", size,
            "--max_eval_samples", size // 2, "--num_workers", 4 if gpu else 0, "--report_to", "none", "--overwrite"]
    supervised = [*data, "--model", "resnet18", "--batch_size", 64 if gpu else 16, "--grad_accum_steps", 1,
                  "--lr", "1e-3", "--epochs", 1]
    ssl = [*data, "--batch_size", 64 if gpu else 16, "--epochs", 2, "--knn_every", 1, "--knn_bank_samples", size // 2]
    half = ["--mixed_precision", "bf16" if gpu else "no"]
    backend = "inductor" if gpu else "aot_eager"
    results = []

    def run(command, extra_env=None, timeout=args.timeout):
        start = time.perf_counter()
        result = subprocess.run([str(c) for c in command], cwd=ROOT, env={**env, **(extra_env or {})}, text=True,
                                capture_output=True, timeout=timeout)
        if result.returncode:
            raise RuntimeError(f"exit {result.returncode} after {time.perf_counter() - start:.0f} s: "
                               + " | ".join((result.stderr or result.stdout).strip().splitlines()[-4:]))
        return result

    def check(name, body, needs_gpus=0, on_cpu=True):
        if not gpu and not on_cpu:
            results.append((name, "SKIP", "runs on GPUs only"))
        elif gpu and needs_gpus and gpus < needs_gpus:
            results.append((name, "SKIP", f"needs {needs_gpus} GPUs, {gpus} here"))
        else:
            start = time.perf_counter()
            try:
                detail = body() or ""
                results.append((name, "PASS", f"{time.perf_counter() - start:.0f} s {detail}"))
            except Exception as e:  # a failed path is reported, and the next one runs
                results.append((name, "FAIL", f"{time.perf_counter() - start:.0f} s {type(e).__name__}: {e}"[:600]))
        print(f"{results[-1][1]:<5} {name}: {results[-1][2]}", flush=True)

    def bare_keys(folder):
        from safetensors.torch import load_file

        keys = list(load_file(os.path.join(folder, "model.safetensors")))
        wrapped = [k for k in keys if "_orig_mod." in k or k.startswith("module.")]
        assert keys and not wrapped, f"wrapper prefixes in {folder}: {wrapped[:3]}"

    run_dir = lambda name: os.path.join(args.work, name)  # noqa: E731

    def bf16_supervised():
        run([PY, "train_supervised.py", *supervised, *half, "--memory_format", "channels_last", "--output_dir",
             run_dir("bf16")])
        result = run([PY, "evaluate.py", "--checkpoint", run_dir("bf16"), "--dims", "8,64,512", "--max_train_samples",
                      4 * size, "--max_eval_samples", size, "--report_to", "none", "--output_dir", run_dir("bf16_eval")])
        funnel = json.load(open(os.path.join(run_dir("bf16_eval"), "results.json")))["runs"][0]["adaptive_retrieval"]
        return "funnel speed-ups " + ", ".join(f"d{r['shortlist_dim']} {r['speedup']:.2f}x" for r in funnel[1:]) + \
            f" ({result.stdout.count('extracted')} splits extracted)"

    def fp16_ssl():
        run([PY, "train_ssl.py", *ssl, "--mixed_precision", "fp16" if gpu else "no", "--gpu_augment",
             "--output_dir", run_dir("fp16")])
        return f"kNN {json.load(open(os.path.join(run_dir('fp16'), 'metrics.json')))['knn_accuracy'][-1]:.3f}"

    def data_on_device():
        out = run_dir("device")
        command = [PY, "train_ssl.py", *ssl, *half, "--data_on_device", "--checkpointing_steps", 3, "--output_dir", out]
        preempt(command, out, 75)
        result = run([*command, "--resume_from_checkpoint", "latest"])
        assert "resumed from" in result.stdout, result.stdout[-500:]

    def preempt(command, out, expected):
        """Start `command` in a session of its own, SIGTERM its group at its first checkpoint, wait for it."""
        from mrl.run_folder.layout import list_checkpoints

        process = subprocess.Popen([str(c) for c in command], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.time() + args.timeout
        while not list_checkpoints(out):
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                raise RuntimeError("no checkpoint: " + " | ".join(process.communicate()[1].splitlines()[-4:]))
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGTERM)
        code = process.wait(timeout=args.timeout)
        assert code == expected and os.path.exists(os.path.join(out, "PREEMPTED")), f"exit {code}, no marker?"

    def compile_supervised():
        out = run_dir("compiled")
        run([PY, "train_supervised.py", *supervised, *half, "--output_dir", out],
            {"ACCELERATE_DYNAMO_BACKEND": backend}, timeout=max(args.timeout, 400))
        bare_keys(out)
        import torch

        from mrl.pretrained import MatryoshkaEncoder

        model = MatryoshkaEncoder.from_pretrained(out, device=args.device)
        z = model.encode(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), dim=16)
        assert z.shape == (4, 16) and torch.isfinite(z).all()

    def embed():
        source = run_dir("bf16")
        out = run_dir("embedded")
        run([PY, "embed.py", "--checkpoint", source, "--dataset", "cifar10", "--dataset_path", args.dataset_path,
             "--split", "test", "--dims", "16,512", "--index_dim", 16, "--output_dir", out, "--overwrite"])
        manifest = json.load(open(os.path.join(out, "embed.json")))
        import datasets

        test = datasets.load_dataset(args.dataset_path, split="test")
        query = os.path.join(args.work, "query.png")
        (test[0].get("img") or test[0].get("image")).save(query)
        result = run([PY, "embed.py", "--index", out, "--query", query, "--top_k", 3])
        assert "test[0]" in result.stdout.splitlines()[2], result.stdout[-500:]
        return f"{manifest['count']} images embedded"

    def sync_bn():
        run([PY, "-m", "mrl.train.supervise", PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2,
             "train_ssl.py", *ssl, *half, "--method", "byol", "--sync_bn", "--output_dir", run_dir("sync_bn")])

    def compile_two_processes():
        out = run_dir("compiled_2proc")
        command = [PY, "-m", "mrl.train.supervise", PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2,
                   "train_ssl.py", *ssl, *half, "--checkpointing_steps", 2, "--output_dir", out]
        env["ACCELERATE_DYNAMO_BACKEND"] = backend
        try:
            preempt(command, out, 75)
            run([*command, "--resume_from_checkpoint", "latest"], timeout=max(args.timeout, 400))
        finally:
            del env["ACCELERATE_DYNAMO_BACKEND"]
        bare_keys(out)

    check("bf16_supervised", bf16_supervised)
    check("fp16_ssl", fp16_ssl)
    check("data_on_device", data_on_device)
    check("compile", compile_supervised)
    check("embed", embed)
    check("sync_bn", sync_bn, needs_gpus=2, on_cpu=False)  # SyncBatchNorm refuses CPU tensors
    check("compile_2proc", compile_two_processes, needs_gpus=2)
    print("=== GPU paths: " + ", ".join(f"{name} {verdict}" for name, verdict, _ in results))


if __name__ == "__main__":
    main()
