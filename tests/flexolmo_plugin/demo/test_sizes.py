"""``flexolmo demo --set FIELD=VALUE``: typed overrides of a demo size (used by the composition ablation)."""

import pytest

from flexolmo_plugin.demo.sizes import SIZES, sized
from flexolmo_plugin.errors import ConfigError


def test_overrides_keep_the_field_types_and_none_switches_the_bias_off():
    size = sized("tiny", {"router_bias_init": "none", "owner_public_share": "0", "owner_iters": "7",
                          "router_lr": "0.5"})
    assert size.router_bias_init is None and size.owner_public_share == 0.0
    assert size.owner_iters == 7 and isinstance(size.owner_iters, int) and size.router_lr == 0.5
    assert sized("tiny", {"router_bias_init": "-2"}).router_bias_init == -2.0
    assert sized("tiny") == SIZES["tiny"]
    assert sized("full", {"unit_document_embeddings": "False"}).unit_document_embeddings is False
    assert sized("full", {"unit_document_embeddings": "true"}).unit_document_embeddings is True


def test_unknown_fields_and_bad_values_are_refused():
    with pytest.raises(ConfigError, match="not a demo size field"):
        sized("tiny", {"no_such_field": "1"})
    with pytest.raises(ConfigError, match="owner_iters=many"):
        sized("tiny", {"owner_iters": "many"})
    with pytest.raises(ConfigError, match="unit_document_embeddings=0: must be true or false"):
        sized("tiny", {"unit_document_embeddings": "0"})  # bool("0") would be True


def test_router_step_settings_are_checked_before_any_work():
    assert sized("tiny", {"router_calibration_scale": "none", "router_iters": "40"}).router_calibration_scale is None
    assert sized("full", {"router_iters": "60"}).router_iters == 60  # alignment, then LM router tuning
    assert sized("tiny", {"router_calibration_scale": "none", "router_scaling_sweeps": "2"}).router_scaling_sweeps == 2
    no_step = {"router_calibration_scale": "none"}
    for overrides, match in ((no_step, "needs router_iters > 0 or router_scaling_sweeps > 0"),
                             ({"router_iters": "-1"}, "router_iters=-1: must be >= 0"),
                             ({"router_scaling_sweeps": "-1"}, "router_scaling_sweeps=-1: must be >= 0"),
                             ({"router_calibration_scale": "0"}, "must be > 0"),
                             ({"calibration_public_weight": "-4"}, "must be > 0"),
                             ({"router_iters": "none"}, "only router_bias_init, router_calibration_scale")):
        with pytest.raises(ConfigError, match=match):
            sized("tiny", overrides)


def test_domain_encoder_must_be_a_directory(tmp_path):
    assert SIZES["full"].domain_encoder == ""  # default: the public model's own hidden states
    assert sized("full", {"domain_encoder": str(tmp_path)}).domain_encoder == str(tmp_path)
    with pytest.raises(ConfigError, match="domain_encoder=.*not a directory"):
        sized("full", {"domain_encoder": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="only router_bias_init"):
        sized("full", {"domain_encoder": "none"})
