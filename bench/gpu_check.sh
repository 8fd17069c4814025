#!/usr/bin/env bash
# The GPU check (issue 21): one short script for a lent GPU machine (the `device` tool: an H100
# with PyTorch, transformers and peft, no package registry, at most 64 MiB carried per call, so
# neither vLLM's CUDA build nor the 260 MB model travels there).
#
# What it runs, printing one JSON line per part:
#   1. the machine: GPU, driver's CUDA, torch and its CUDA, and vbs's own checks on them
#      (`vbs_cli.doctor.cuda_fits_driver`, `vbs_resources.engine.hardware.flashinfer_sampler`);
#   2. the `hf` trainer's recipe on CUDA (vbs_resources/training/hf_backend.py: the base in bf16
#      where the GPU has it, LoRA r 16 / alpha 32 on every linear layer, AdamW at 2e-4, batches
#      of 8) as a plain loop over transformers + peft: vbs's backend itself needs dagster, trl
#      and datasets, which the device machine lacks. Seconds per step (after two warm-up
#      steps), peak GPU memory, the loss at the first and last of 20 steps.
#   The model: $VBS_MODEL, else .vbs/models/SmolLM2-135M-Instruct; where only its config and
#   tokenizer were carried (`carry` the folder's *.json files), SmolLM2-135M's architecture
#   with random weights: the same shapes and arithmetic, so the same seconds and memory; the
#   loss then falls from ~11 rather than ~4 (it learns the 64 examples either way).
#
# Run on the device:  bash bench/gpu_check.sh            (about a minute on an H100)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
nvidia-smi || echo '{"part": "machine", "nvidia_smi": "absent"}'
exec "$PY" - "$@" <<'PYEOF'
import importlib.util, json, os, re, subprocess, sys, time, types
from pathlib import Path

sys.path.insert(0, os.getcwd())
import torch

def out(**row):
    print(json.dumps(row), flush=True)

# Load vbs modules that need no dagster without running vbs_resources/__init__ (which does).
for name in ("vbs_resources", "vbs_resources.engine", "vbs_cli"):
    if name not in sys.modules and importlib.util.find_spec("dagster") is None:
        package = types.ModuleType(name)
        package.__path__ = [str(Path(*name.split(".")))]
        sys.modules[name] = package
if importlib.util.find_spec("pydantic") is None:  # settings.py needs it; the check does not
    sys.modules["vbs_resources.settings"] = types.SimpleNamespace(set_library_defaults=lambda **_: None)
from vbs_resources.engine.hardware import flashinfer_sampler, torch_cuda_version

smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout if torch.cuda.is_available() else ""
driver = re.search(r"CUDA Version:\s*([0-9]+\.[0-9]+)", smi)
driver_cuda = driver.group(1) if driver else None
wanted = tuple(int(x) for x in (torch.version.cuda or "0.0").split(".")[:2])
have = tuple(int(x) for x in (driver_cuda or "0.0").split(".")[:2])
out(part="machine", gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    driver_cuda=driver_cuda, torch=torch.__version__, torch_cuda=torch.version.cuda,
    torch_cuda_read_by_vbs=torch_cuda_version(),
    fits_driver=wanted <= have if torch.version.cuda and driver_cuda else None,
    bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    flashinfer_sampler_setting=flashinfer_sampler())
# GPU_CHECK_ON_CPU=1 runs the rest on the CPU: a rehearsal of the script where no GPU is lent.
on = "cuda" if torch.cuda.is_available() else "cpu" if os.environ.get("GPU_CHECK_ON_CPU") else None
if on is None:
    sys.exit("no CUDA device: nothing more to check (GPU_CHECK_ON_CPU=1 rehearses it on the CPU)")
sync = torch.cuda.synchronize if on == "cuda" else (lambda: None)

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from peft import LoraConfig, get_peft_model

folder = Path(os.environ.get("VBS_MODEL", ".vbs/models/SmolLM2-135M-Instruct"))
weights = any(folder.glob("*.safetensors"))
tokenizer = AutoTokenizer.from_pretrained(folder)
tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
dtype = torch.bfloat16 if on == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
torch.manual_seed(0)
model = (AutoModelForCausalLM.from_pretrained(folder, dtype=dtype) if weights else
         AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)).to(on)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                         target_modules=targets, task_type="CAUSAL_LM"))
examples = [[{"role": "user", "content": f"What is the code word {i}?"},
             {"role": "assistant", "content": f"The code word {i} is zebra-{i}."}] for i in range(64)]
texts = [tokenizer.apply_chat_template(e, tokenize=False) for e in examples]
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
steps, batch, losses, seconds = 20, 8, [], []
if on == "cuda":
    torch.cuda.reset_peak_memory_stats()
model.train()
for step in range(steps):
    chunk = texts[(step * batch) % 64:(step * batch) % 64 + batch]
    enc = tokenizer(chunk, return_tensors="pt", padding=True).to(on)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    sync(); started = time.perf_counter()
    loss = model(**enc, labels=labels).loss
    loss.backward(); optimizer.step(); optimizer.zero_grad()
    sync(); seconds.append(time.perf_counter() - started)
    losses.append(round(loss.item(), 4))
out(part=f"hf recipe on {on}", through="transformers + peft loop (vbs's hf recipe)",
    model=str(folder), weights="packaged" if weights else "random (architecture from config.json)",
    dtype=str(dtype), steps=steps, batch=batch,
    seconds_per_step=round(sum(seconds[2:]) / len(seconds[2:]), 4),
    first_step_s=round(seconds[0], 3), peak_gpu_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1) if on == "cuda" else None,
    loss_first=losses[0], loss_last=losses[-1], loss_fell=losses[-1] < losses[0])
PYEOF
