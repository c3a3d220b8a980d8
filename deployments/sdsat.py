"""The SDSAT Serve application: ``Router`` (HTTP) -> ``SDSATServer`` (model replicas).

    serve run deployments.sdsat:app                      # the default model, default settings (CPU)
    serve run deployments.sdsat:build_app model=/path/to/checkpoint num_sat=4 dtype=float32 \
        replicas=1 max_replicas=4 gpus_per_replica=1 max_batch_size=16 api_key=secret
    serve deploy configs/serve_cluster.yaml              # the same arguments from a config file

Everything is decided from the arguments when the app is built, never from the machine that
imports this module: a CPU head whose GPU workers are scaled to zero still builds GPU replicas.
"""

from __future__ import annotations

import logging
import os

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.exposure import check_exposure, serve_http_host
from deployments.router import Router, RouterSettings
from deployments.server import SDSATServer, ServerSettings

log = logging.getLogger(__name__)

API_KEY_ENV = "SDSAT_API_KEY"


class AppArgs(BaseModel):
    """Arguments of ``build_app`` (``key=value`` on the ``serve run`` command line, or ``args:`` in a config)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("default", description='"default" (the fine-tuned default export, else the base model), a checkpoint dir or HF id.')
    model_name: str | None = Field(None, description="Name clients pass as `model` (default: sdsat-<model dir name>).")
    num_sat: int | None = Field(None, ge=0, description="Cap on SATs per draft (default: all the model has; 0: plain decoding).")
    dtype: str = Field("bfloat16", description="float32, bfloat16 or float16 (GPU only). fp32 makes greedy output exact.")
    replicas: int = Field(1, ge=1, description="Model replicas (the minimum when autoscaling).")
    max_replicas: int | None = Field(None, ge=1, description="Autoscale between `replicas` and this (None: fixed count).")
    target_ongoing_requests: float = Field(4.0, gt=0, description="Autoscaling target of ongoing requests per replica.")
    upscale_delay_s: float = Field(5.0, ge=0, description="Autoscaling: how long load must be high before adding replicas.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Autoscaling: how long load must be low before removing replicas.")
    gpus_per_replica: float = Field(
        0, ge=0, description="GPUs per model replica: 0 (CPU), 1, or a fraction to share one GPU. The model sits on one GPU."
    )
    kv_cache_gb: float | None = Field(
        None, gt=0, description="KV-cache budget per replica in GB; admission waits while it is full (default: 90% of the GPU "
        "memory free after loading; no limit on CPU)."
    )
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs per model replica (fractional allowed).")
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads per model replica (default: Ray's OMP_NUM_THREADS, the floor of cpus_per_replica, at least 1)."
    )
    router_cpus: float = Field(0.1, ge=0, description="CPUs reserved per router replica (0: none, as for Serve's own proxy).")
    router_replicas: int = Field(1, ge=1, description="Router (HTTP ingress) replicas.")
    max_batch_size: int = Field(16, ge=1, description="Most requests one engine decodes together.")
    max_ongoing_requests: int = Field(32, ge=1, description="Requests a model replica holds at once (batch + its queue).")
    max_queued_requests: int = Field(64, ge=-1, description="Requests waiting for a replica before 503s (-1: no limit).")
    max_tokens_limit: int = Field(2048, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens for chat requests that give none.")
    replica_retries: int = Field(
        3, ge=0, description="Times a request is sent again when its replica dies before the client got any of it."
    )
    lookup: int = Field(
        16, ge=0, description="Prompt-lookup trie nodes a row may offer per pass (0: none); the scheduler picks how many."
    )
    calibration_budget_s: float = Field(
        8.0, ge=0, description="Seconds of start-up pass-cost measurement, interleaved with serving (0: never draft)."
    )
    kernel_choice: bool = Field(
        True, description="CPU bf16: measure ATen, oneDNN and packed oneDNN matmuls per pass width at start-up (~8 s, before serving) and use the fastest."
    )
    compile: bool = Field(
        False, description="torch.compile the decode step (sdsat/decode/compiled.py): for GPU replicas; the first requests wait for compiling."
    )
    api_key: str | None = Field(None, description=f"Require 'Authorization: Bearer <key>' (default: ${API_KEY_ENV} if set).")
    allow_unauthenticated: bool = Field(
        False, description="Serve without an API key even where Serve listens beyond loopback (logged). Without it such an app is refused."
    )

    @model_validator(mode="after")
    def _check(self) -> "AppArgs":
        if self.gpus_per_replica > 1:
            raise ValueError(
                f"gpus_per_replica={self.gpus_per_replica:g}: a replica places its whole model on one GPU (a 7B model in "
                "bf16 needs ~15 GB of weights, a 13B ~26 GB: both fit one 40-80 GB GPU), so more GPUs per replica would "
                "sit idle; use gpus_per_replica=1 and raise replicas / max_replicas"
            )
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= replicas ({self.replicas})")
        if self.max_batch_size > self.max_ongoing_requests:
            raise ValueError("max_batch_size cannot exceed max_ongoing_requests (the batch would never fill)")
        return self


def served_name(model: str) -> str:
    return "sdsat-" + model.rstrip("/").split("/")[-1]


def build_app(args: AppArgs | dict | None = None):
    """The application for these arguments (``serve run deployments.sdsat:build_app k=v ...``)."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    name = args.model_name or served_name(args.model)
    gpus = args.gpus_per_replica
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    check_exposure(serve_http_host(), api_key, args.allow_unauthenticated)
    server = ServerSettings(
        model=args.model,
        model_name=name,
        dtype=args.dtype,
        num_sat=args.num_sat,
        max_batch_size=args.max_batch_size,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens,
        max_queue=max(args.max_ongoing_requests, args.max_batch_size),
        lookup=args.lookup,
        calibration_budget_s=args.calibration_budget_s,
        kernel_choice=args.kernel_choice,
        gpus=gpus,
        kv_cache_gb=args.kv_cache_gb,
        compile=args.compile,
        torch_threads=args.torch_threads,
    )
    options: dict = {
        "ray_actor_options": {"num_cpus": args.cpus_per_replica, "num_gpus": gpus},
        "max_ongoing_requests": args.max_ongoing_requests,
        "max_queued_requests": args.max_queued_requests,
    }
    if args.max_replicas is not None and args.max_replicas > args.replicas:
        options["autoscaling_config"] = {
            "min_replicas": args.replicas,
            "initial_replicas": args.replicas,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
            "upscale_delay_s": args.upscale_delay_s,
            "downscale_delay_s": args.downscale_delay_s,
        }
    else:
        options["num_replicas"] = args.replicas
    model_deployment = SDSATServer.options(**options).bind(server)
    router = Router.options(num_replicas=args.router_replicas, ray_actor_options={"num_cpus": args.router_cpus})
    log.info("SDSAT app: model %s as %r, %s GPU(s)/replica, auth %s", args.model, name, gpus, "on" if api_key else "off")
    return router.bind(model_deployment, RouterSettings(model_name=name, api_key=api_key or None, replica_retries=args.replica_retries))


def __getattr__(name: str):
    """``deployments.sdsat:app``: the default app, built when asked for (not at import, so that
    importing this module neither loads torch's device state nor checks the HTTP host)."""
    if name == "app":
        return build_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
