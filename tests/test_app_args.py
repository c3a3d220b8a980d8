"""The Serve app's arguments: the shipped config validates, and bad combinations are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.sdsat import AppArgs

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "serve_default.yaml"


def test_shipped_serve_config_is_valid_app_args():
    args = yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]
    parsed = AppArgs.model_validate(args)
    assert set(args) <= set(AppArgs.model_fields)  # no key the app would ignore
    assert parsed.lookup == 16 and parsed.calibration_budget_s > 0


@pytest.mark.parametrize(
    "args, message",
    [
        ({"calibration_budget_s": -1}, "calibration_budget_s"),
        ({"lookup": -1}, "lookup"),
        ({"replica_retries": -1}, "replica_retries"),
        ({"replicas": 3, "max_replicas": 2}, "max_replicas"),
    ],
)
def test_bad_app_args_are_refused(args, message):
    with pytest.raises(ValidationError, match=message):
        AppArgs.model_validate(args)
