"""Which CPU matmul kernels a pass runs on, chosen by its token count from measured times.

torch computes a bf16 linear layer on a CPU either through oneDNN (mkldnn) or through its own
ATen kernel, and which is faster depends on the shape. Measured on a 2-core AMD EPYC with
native bf16 (the default model, bf16, one row): a 1-token pass took ~50 ms through oneDNN and
~26 ms through ATen, a 6-token pass ~50 ms through oneDNN and ~70 ms through ATen. Plain
decoding is all 1-token passes, so the kernel choice alone moves it by up to 2x, and a
decoder that drafts wants oneDNN for its wide passes.

:func:`choose_kernels` times passes of 1, 2, 3, 4, 6, 8, 12 and 16 tokens both ways (about
five seconds on a 2-core CPU) and installs a forward pre-hook on the model's decoder that switches oneDNN off
for passes of at most ``aten_max_tokens`` tokens (rows x query tokens; :func:`crossover`) and on
for wider ones.
Every caller of the model then gets the faster kernel: plain decoding, the SDSAT decoder and
the serving engine alike, so the speed-up a benchmark reports is against the fastest plain
decoding, not against a slow kernel. On a GPU, in fp32 or without oneDNN it does nothing
(the record says why). Both kernels compute the same products; in bf16 they may round
differently, as any change of pass shape does.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

log = logging.getLogger(__name__)

SIZES = (1, 2, 3, 4, 6, 8, 12, 16)  # tokens per timed pass
ATTR = "_sdsat_kernel_hook"


@dataclass
class KernelChoice:
    """oneDNN off for passes of at most ``aten_max_tokens`` tokens (0: never off)."""

    aten_max_tokens: int = 0
    reason: str = ""
    measured_ms: dict = field(default_factory=dict)  # tokens -> {"onednn": ms, "aten": ms}

    def to_dict(self) -> dict:
        return asdict(self)


def crossover(times: dict[int, dict[str, float]], margin: float = 0.05) -> int:
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


def choose_kernels(loaded, sizes=SIZES, reps: int = 3, timer=None) -> KernelChoice:
    """Measure both kernels on passes of ``sizes`` tokens and install the faster choice on
    ``loaded.model`` (replacing an earlier one). ``timer(n, onednn) -> seconds`` replaces the
    measurement (tests)."""
    model = loaded.model
    remove_kernel_choice(model)
    why = applies(model)
    if why:
        return KernelChoice(reason=why)
    timer = timer or _pass_timer(model, max(sizes))
    times = {}
    for n in sizes:
        for onednn in (True, False):
            timer(n, onednn)  # warm-up: a shape's first call costs more
        runs = {True: [], False: []}
        for _ in range(reps):  # alternate, so drift hits both alike
            for onednn in (True, False):
                runs[onednn].append(timer(n, onednn))
        times[n] = {"onednn": statistics.median(runs[True]) * 1000, "aten": statistics.median(runs[False]) * 1000}
    limit = crossover(times)
    choice = KernelChoice(limit, "measured" if limit else "measured: oneDNN is as fast at every size",
                          {n: {k: round(v, 2) for k, v in t.items()} for n, t in times.items()})
    if limit:
        install(model, limit)
    log.info("CPU kernels: ATen for passes of <= %d tokens, oneDNN above (%s)", limit, choice.measured_ms)
    return choice


def install(model: torch.nn.Module, aten_max_tokens: int) -> None:
    """Switch oneDNN off before every decoder pass of at most ``aten_max_tokens`` tokens and
    on before wider ones (the LM head after it runs under the same setting)."""
    remove_kernel_choice(model)

    def switch(module, args, kwargs):
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        if x is not None:
            tokens = x.shape[0] * x.shape[1] if x.dim() >= 2 else x.numel()
            torch.backends.mkldnn.enabled = tokens > aten_max_tokens

    handle = model.get_decoder().register_forward_pre_hook(switch, with_kwargs=True)
    setattr(model, ATTR, handle)


def remove_kernel_choice(model: torch.nn.Module) -> None:
    """Take an installed choice off and switch oneDNN back on (torch's default)."""
    handle = getattr(model, ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(model, ATTR)
        torch.backends.mkldnn.enabled = True


def _pass_timer(model: torch.nn.Module, longest: int):
    """Seconds of one decoder + LM head pass over n fresh tokens (the linear layers dominate;
    a short context keeps attention negligible, as in decoding at this model's sizes)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, min(vocab, 1000), (1, longest), generator=torch.Generator().manual_seed(0))
    ids = ids.to(next(model.parameters()).device)

    @torch.no_grad()
    def run(n: int, onednn: bool) -> float:
        before = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = onednn
        try:
            start = time.perf_counter()
            hidden = model.get_decoder()(input_ids=ids[:, :n], use_cache=False).last_hidden_state
            model.get_output_embeddings()(hidden[:, -1:])
            return time.perf_counter() - start
        finally:
            torch.backends.mkldnn.enabled = before

    return run
