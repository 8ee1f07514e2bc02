"""Which sets calibrl-eval evaluates (calibrl.eval.job._eval_sets): in-domain, out-of-domain, or both."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from calibrl.config import ConfigError
from calibrl.eval.job import _eval_sets


def _cfg(in_domain, sets):
    return OmegaConf.create({"data": {"name": "chain_sum"}, "in_domain": in_domain,
                             "eval_sets": {k: {"name": k} for k in sets}})


def test_in_domain_first_then_eval_sets():
    assert list(_eval_sets(_cfg(True, ["products"]))) == ["chain_sum", "products"]


def test_out_of_domain_only():
    assert list(_eval_sets(_cfg(False, ["products"]))) == ["products"]


def test_nothing_to_evaluate_is_an_error():
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        _eval_sets(_cfg(False, []))
