"""The GPU check: the two depthwise convolution paths agree, then speed and peak memory, published way vs ours.

One command on a machine with one CUDA GPU (under 8 minutes), one table:

1. correctness: at each RepUX-Net stage shape, the FFT depthwise 21^3 convolution against cuDNN's
   (``F.conv3d``, TF32 off): output and the gradients of input, kernel and bias (relative error);
2. the depthwise convolution, forward + backward, native vs FFT: per stage shape at kernel 21, and over
   kernel sizes at the first stage's shape, from which ``FFT_MIN_KERNEL["cuda"]`` is chosen (printed);
3. a full-size RepUX-Net training step (2 crops of 96^3, DiceCE, AdamW): published (native convolution
   over the whole kernel, fp32) vs ours (automatic convolution; fp32, bf16, fp16 with a gradient scaler),
   and ours in fp32 through the engine's step with its non-finite guard (the guard's extra host sync);
4. sliding-window inference of one 192x192x128 volume (roi 96, overlap 0.5), published vs ours.

Seconds are means over ``torch.utils.benchmark.Timer`` runs (which synchronise CUDA); peak memory is
CUDA's peak allocation (n/a on the CPU). ``--smoke`` runs the same code on the CPU at tiny sizes, in
seconds (a test runs it).

    python bench/gpu_check.py --json bench/results/gpu_check.json
    python bench/gpu_check.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass

import common
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from torch.utils.benchmark import Timer

import networks.dwconv as dwconv
from engine.distributed import Distributed
from engine.train import _training_step
from networks import build_network


@dataclass(frozen=True)
class Sizes:
    """The configuration a check runs at: the network, the crops, the inference volume, the stage shapes
    of the convolution checks and the kernel sizes of the sweep."""

    feat_size: tuple[int, ...]
    hidden_size: int
    kernel: int
    crop: int
    crops: int
    volume: tuple[int, int, int]
    stages: tuple[tuple[int, int], ...]
    sweep: tuple[int, ...]
    repeats: int


#: The published RepUX-Net on 96^3 crops; its stage shapes (channels, edge) for a 96^3 input.
FULL = Sizes(
    feat_size=(48, 96, 192, 384),
    hidden_size=768,
    kernel=21,
    crop=96,
    crops=2,
    volume=(192, 192, 128),
    stages=((48, 48), (96, 24), (192, 12), (384, 6)),
    sweep=(3, 5, 7, 9, 11, 15, 21),
    repeats=3,
)
SMOKE = Sizes(
    feat_size=(4, 8, 16, 32),
    hidden_size=16,
    kernel=7,
    crop=32,
    crops=1,
    volume=(48, 48, 32),
    stages=((4, 16), (8, 8)),
    sweep=(3, 5, 7),
    repeats=1,
)
#: The most the relative error of the FFT path may be, against cuDNN in full fp32.
TOLERANCE = 1e-4


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30))


def check_convolution(device: torch.device, sizes: Sizes) -> list[list]:
    """Rows of the correctness check; raises AssertionError past :data:`TOLERANCE`."""
    rows = []
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # a reference in full fp32
    try:
        for channels, edge in sizes.stages:
            generator = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(1, channels, edge, edge, edge, generator=generator).to(device)
            weight = torch.randn(channels, 1, *(sizes.kernel,) * 3, generator=generator).to(device) / sizes.kernel**1.5
            bias = torch.randn(channels, generator=generator).to(device)
            upstream = torch.randn(1, channels, edge, edge, edge, generator=generator).to(device)
            results = {}
            for path in ("native", "fft"):
                inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
                padding = (sizes.kernel // 2,) * 3
                if path == "native":
                    out = F.conv3d(*inputs, padding=padding, groups=channels)
                else:
                    out = dwconv.fft_depthwise_conv3d(*inputs, padding)
                out.backward(upstream)
                results[path] = [out.detach()] + [t.grad for t in inputs]
            errors = [relative_error(f, n) for f, n in zip(results["fft"], results["native"], strict=True)]
            shape = f"1x{channels}x{edge}^3, k={sizes.kernel}"
            rows.append(["correctness", shape, "max rel. error (out, dx, dW, db)", f"{max(errors):.1e}", "", ""])
            assert max(errors) < TOLERANCE, f"FFT convolution differs from cuDNN at {shape}: {errors}"
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return rows


def seconds(function, repeats: int) -> float:
    """Seconds per call of ``function``: the mean of ``repeats`` calls after the Timer's two warm-up calls
    (the Timer synchronises CUDA)."""
    return Timer(stmt="function()", globals={"function": function}).timeit(repeats).mean


def peak_mib(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}" if device.type == "cuda" else "n/a"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def convolution_seconds(channels: int, edge: int, kernel: int, path: str, device: torch.device, repeats: int):
    x = torch.randn(1, channels, edge, edge, edge, device=device, requires_grad=True)
    weight = torch.randn(channels, 1, kernel, kernel, kernel, device=device, requires_grad=True)

    def step():
        x.grad = weight.grad = None
        dwconv.depthwise_conv3d(x, weight, None, kernel // 2, path).sum().backward()

    with dwconv.full_kernels() if path == "native" else contextlib.nullcontext():
        return seconds(step, repeats)


def time_convolution(device: torch.device, sizes: Sizes) -> tuple[list[list], int | None]:
    """Rows of native vs FFT per stage shape and over kernel sizes; the smallest kernel from which FFT
    wins at every larger kernel of the sweep (None when it never does)."""
    rows, fft_wins = [], {}
    shapes = [(c, e, sizes.kernel) for c, e in sizes.stages]
    shapes += [(*sizes.stages[0], k) for k in sizes.sweep if k != sizes.kernel]
    for channels, edge, kernel in shapes:
        native = convolution_seconds(channels, edge, kernel, "native", device, sizes.repeats)
        fft = convolution_seconds(channels, edge, kernel, "fft", device, sizes.repeats)
        shape = f"1x{channels}x{edge}^3, k={kernel}"
        rows.append(
            ["depthwise fwd+bwd", shape, "native / FFT", f"{native:.4f} / {fft:.4f}", f"{native / fft:.2f}x", ""]
        )
        if (channels, edge) == sizes.stages[0]:
            fft_wins[kernel] = fft < native
    winning = [k for k in sorted(fft_wins) if all(fft_wins[j] for j in fft_wins if j >= k)]
    return rows, (winning[0] if winning else None)


VARIANTS = {  # name: (convolution algorithm, autocast dtype, whole kernels as published)
    "published (native, fp32)": ("native", None, True),
    "ours (fp32)": ("auto", None, False),
    "ours (bf16 autocast)": ("auto", torch.bfloat16, False),
    "ours (fp16 autocast + scaler)": ("auto", torch.float16, False),
}


def time_model(task: str, variant: str, device: torch.device, sizes: Sizes, guard: bool = False) -> list:
    """One row: a training step or a sliding-window inference of the full-size RepUX-Net."""
    algorithm, dtype, whole_kernels = VARIANTS[variant]
    torch.manual_seed(0)
    model = build_network("REPUXNET", 1, 5, feat_size=sizes.feat_size, hidden_size=sizes.hidden_size, ks=sizes.kernel)
    model.to(device)
    autocast = torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    kernels = dwconv.full_kernels() if whole_kernels else contextlib.nullcontext()
    reset_peak(device)
    with dwconv.use_algorithm(algorithm), kernels:
        if task == "train":
            loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
            crops = (sizes.crops, 1, *(sizes.crop,) * 3)
            batch = {"image": torch.randn(crops, device=device), "label": torch.randint(0, 5, crops, device=device)}

            def step():
                if guard:  # the engine's step: non-finite loss and gradient guard, BatchNorm statistics kept
                    _training_step(model, batch, loss_function, optimizer, scaler, autocast, [], Distributed(), device)
                    return
                with autocast:
                    loss = loss_function(model(batch["image"]), batch["label"])
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
        else:
            model.switch_to_deploy()
            model.eval()
            volume = torch.randn(1, 1, *sizes.volume, device=device)

            def step():
                with torch.no_grad(), autocast:
                    sliding_window_inference(volume, (sizes.crop,) * 3, 4, model, overlap=0.5)

        measured = seconds(step, sizes.repeats)
    what = f"{sizes.crops} x {sizes.crop}^3" if task == "train" else "x".join(map(str, sizes.volume))
    name = f"{variant}, engine step with guard" if guard else variant
    return [
        f"RepUX-Net {'training step' if task == 'train' else 'inference'}",
        what,
        name,
        f"{measured:.3f}",
        "",
        peak_mib(device),
    ]


def run_checks(device: torch.device, sizes: Sizes) -> tuple[list[list], int | None]:
    rows = check_convolution(device, sizes)
    convolution_rows, threshold = time_convolution(device, sizes)
    rows += convolution_rows
    variants = [v for v in VARIANTS if device.type == "cuda" or "fp16" not in v]  # fp16 autocast needs CUDA
    for task in ("train", "infer"):
        task_rows = [time_model(task, variant, device, sizes) for variant in variants]
        if task == "train":
            task_rows.append(time_model(task, "ours (fp32)", device, sizes, guard=True))
        published = float(task_rows[0][3])
        for row in task_rows:
            row[4] = f"{published / float(row[3]):.2f}x"
        rows += task_rows
    return rows, threshold


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the same code on the CPU at tiny sizes (seconds)")
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run it on a GPU machine, or pass --smoke for the CPU at tiny sizes")
    device = torch.device("cpu" if args.smoke else "cuda")
    rows, threshold = run_checks(device, SMOKE if args.smoke else FULL)
    header = ["part", "shape", "variant", "seconds", "vs published", "peak MiB"]
    print(f"{common.machine()['device']}, torch {torch.__version__}")
    print(common.markdown_table(header, rows))
    print(
        f"FFT from kernel {threshold} on at the first stage's shape: FFT_MIN_KERNEL['{device.type}'] = {threshold} "
        f"(now {dwconv.FFT_MIN_KERNEL.get(device.type)})"
        if threshold
        else "FFT never faster than native over the sweep: keep the native path on this device"
    )
    common.write_json(
        args.json, {"machine": common.machine(), "header": header, "rows": rows, "fft_min_kernel": threshold}
    )


if __name__ == "__main__":
    main()
