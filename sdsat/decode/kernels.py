"""Which CPU matmul kernels a pass runs on, chosen by its token count from measured times.

torch computes a bf16 linear layer on a CPU either through oneDNN (mkldnn) or through its own
ATen kernel, and which is faster depends on the shape. Measured on a 2-core AMD EPYC with
native bf16 (the default model, bf16, one row): a 1-token pass took ~50 ms through oneDNN and
~26 ms through ATen, a 6-token pass ~50 ms through oneDNN and ~70 ms through ATen. Plain
decoding is all 1-token passes, so the kernel choice alone moves it by up to 2x, and a
decoder that drafts wants oneDNN for its wide passes.

:func:`choose_kernels` times passes of 1, 2, 3, 4, 6, 8, 12 and 16 tokens both ways (about
five seconds on a 2-core CPU, eight with the packed kernel) and installs a forward pre-hook on the model's decoder that switches oneDNN off
for passes of at most ``aten_max_tokens`` tokens (rows x query tokens; :func:`crossover`) and on
for wider ones.
oneDNN reorders a plain weight into its own layout on every call; where packing pays,
oneDNN runs on weights packed once instead (:mod:`sdsat.decode.packed`): the choice also
times the packed kernel and keeps it when it beats plain oneDNN over the measured sizes by
more than the margin (the crossover is then between ATen and packed oneDNN).
Every caller of the model then gets the faster kernel: plain decoding, the SDSAT decoder and
the serving engine alike, so the speed-up a benchmark reports is against the fastest plain
decoding, not against a slow kernel. On a GPU, in fp32 or without oneDNN it does nothing
(the record says why). Both kernels compute the same products; in bf16 they may round
differently, as any change of pass shape does.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from .packed import PackedLinears, pack

log = logging.getLogger(__name__)

SIZES = (1, 2, 3, 4, 6, 8, 12, 16)  # tokens per timed pass
ATTR = "_sdsat_kernel_hook"
PACKS = "_sdsat_packs"
MARGIN = 0.05  # a kernel replaces another only when faster by more than this


@dataclass
class KernelChoice:
    """oneDNN off for passes of at most ``aten_max_tokens`` tokens (0: never off); oneDNN on
    packed weights (``packed``) for the wider ones."""

    aten_max_tokens: int = 0
    reason: str = ""
    measured_ms: dict = field(default_factory=dict)  # tokens -> {"onednn": ms, "aten": ms[, "packed": ms]}
    packed: bool = False
    packing: str = ""  # why oneDNN does not run on packed weights, where it was not measured

    def to_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        onednn = "packed oneDNN" if self.packed else "oneDNN"
        return f"ATen <= {self.aten_max_tokens} tokens, {onednn} above" if self.aten_max_tokens else onednn


def crossover(times: dict[int, dict[str, float]], margin: float = MARGIN) -> int:
    """The token count T for "ATen up to T tokens, oneDNN above": the largest measured size at
    which ATen was faster by more than ``margin`` with no smaller size where oneDNN was faster by
    more than it; 0 (torch's default, oneDNN throughout) where there is none. Sizes within the
    margin count for neither: repeated measurements move by about that much, and a near-tie
    is not worth switching kernels for."""
    best = 0
    for n in sorted(times):
        aten, onednn = times[n]["aten"], times[n]["onednn"]
        if onednn * (1 + margin) < aten:
            break
        if aten * (1 + margin) < onednn:
            best = n
    return best


def packing_pays(times: dict[int, dict[str, float]], margin: float = MARGIN) -> bool:
    """Packed oneDNN beats plain oneDNN: faster by more than ``margin`` over all measured
    sizes together and slower by more than it at none."""
    sizes = [n for n in times if "packed" in times[n]]
    if not sizes:
        return False
    if any(times[n]["packed"] > times[n]["onednn"] * (1 + margin) for n in sizes):
        return False
    return sum(times[n]["packed"] for n in sizes) * (1 + margin) < sum(times[n]["onednn"] for n in sizes)


def applies(model: torch.nn.Module) -> str:
    """"" where a kernel choice can matter for this model, else why not."""
    p = next(model.parameters())
    if p.device.type != "cpu":
        return f"not a CPU model ({p.device.type})"
    if p.dtype not in (torch.bfloat16, torch.float16):
        return f"{str(p.dtype).removeprefix('torch.')}: one kernel family"
    if not torch.backends.mkldnn.is_available():
        return "this torch has no oneDNN"
    return ""


def choose_kernels(loaded, sizes=SIZES, reps: int = 3, timer=None, packer=pack) -> KernelChoice:
    """Measure the kernels on passes of ``sizes`` tokens and install the faster choice on
    ``loaded.model`` (replacing an earlier one). ``timer(n, kernel) -> seconds`` (kernel:
    "onednn", "aten" or "packed") replaces the measurement, ``packer(model) -> (packs, why
    not)`` the packing (tests)."""
    model = loaded.model
    remove_kernel_choice(model)
    why = applies(model)
    if why:
        return KernelChoice(reason=why)
    packs, packing = packer(model)
    kernels = ("onednn", "aten", "packed") if packs is not None else ("onednn", "aten")
    timer = timer or _pass_timer(model, max(sizes), packs)
    times = {}
    for n in sizes:
        for kernel in kernels:
            timer(n, kernel)  # warm-up: a shape's first call costs more
        runs = {kernel: [] for kernel in kernels}
        for _ in range(reps):  # alternate, so drift hits every kernel alike
            for kernel in kernels:
                runs[kernel].append(timer(n, kernel))
        # The fastest repetition: on a shared machine interference only ever adds time. With
        # the median, one slow pair of three (a 12-token packed pass at 82 ms against 77 ms
        # unpacked, where four earlier choices had measured it 10-15% faster) vetoed packing
        # in one of five choices on the Intel Xeon here, and the 6-token pass then cost 1.78x
        # a 1-token pass instead of 1.25x.
        times[n] = {kernel: min(r) * 1000 for kernel, r in runs.items()}
    packed = packing_pays(times)
    if packs is not None and not packed:
        packs.remove()
        packs, packing = None, "measured: packing did not pay"
    wide = "packed" if packed else "onednn"
    limit = crossover({n: {"aten": t["aten"], "onednn": t[wide]} for n, t in times.items()})
    choice = KernelChoice(limit, "measured" if limit or packed else "measured: oneDNN is as fast at every size",
                          {n: {k: round(v, 2) for k, v in t.items()} for n, t in times.items()}, packed, packing)
    if limit or packed:
        install(model, limit, packs)
    log.info("CPU kernels: %s (%s)", choice.label(), choice.measured_ms)
    return choice


def install(model: torch.nn.Module, aten_max_tokens: int, packs: PackedLinears | None = None) -> None:
    """Switch oneDNN off before every decoder pass of at most ``aten_max_tokens`` tokens and
    on before wider ones, on the packed weights where ``packs`` are given (the LM head after
    the decoder runs under the same setting)."""
    remove_kernel_choice(model, keep_packs=packs)

    def switch(module, args, kwargs):
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        if x is not None:
            tokens = x.shape[0] * x.shape[1] if x.dim() >= 2 else x.numel()
            wide = tokens > aten_max_tokens
            torch.backends.mkldnn.enabled = wide
            if packs is not None:
                packs.on = wide

    handle = model.get_decoder().register_forward_pre_hook(switch, with_kwargs=True)
    setattr(model, ATTR, handle)
    if packs is not None:
        model.__dict__[PACKS] = packs  # not a submodule, not a parameter


def remove_kernel_choice(model: torch.nn.Module, keep_packs: PackedLinears | None = None) -> None:
    """Take an installed choice off (and its packed weights, but ``keep_packs``) and switch
    oneDNN back on (torch's default)."""
    handle = getattr(model, ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(model, ATTR)
        torch.backends.mkldnn.enabled = True
    packs = model.__dict__.pop(PACKS, None)
    if packs is not None and packs is not keep_packs:
        packs.remove()


@contextmanager
def using(kernel: str, packs: PackedLinears | None = None):
    """Run the block on one kernel: "aten", "onednn" or "packed" (oneDNN on ``packs``);
    torch's setting is restored after it."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = kernel != "aten"
    if packs is not None:
        packs.on = kernel == "packed"
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before
        if packs is not None:
            packs.on = False


def _pass_timer(model: torch.nn.Module, longest: int, packs: PackedLinears | None = None):
    """Seconds of one decoder + LM head pass over n fresh tokens (the linear layers dominate;
    a short context keeps attention negligible, as in decoding at this model's sizes)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, min(vocab, 1000), (1, longest), generator=torch.Generator().manual_seed(0))
    ids = ids.to(next(model.parameters()).device)

    @torch.no_grad()
    def run(n: int, kernel: str) -> float:
        with using(kernel, packs):
            start = time.perf_counter()
            hidden = model.get_decoder()(input_ids=ids[:, :n], use_cache=False).last_hidden_state
            model.get_output_embeddings()(hidden[:, -1:])
            return time.perf_counter() - start

    return run
