"""The collapse detector: each signal trips on a built genotype or built architecture parameters
(no training), published genotypes trip none, and the DARTS+ early stop freezes the architecture."""

import dataclasses

import pytest
import torch

from rarn.config import ConfigError, ConstraintConfig, DataConfig, SearchConfig, check
from rarn.data import load_dataset
from rarn.nas.collapse import (
    PARAMETER_FREE,
    CollapseLimits,
    cell_log_lipschitz,
    detect_collapse,
    lambda_ranking_share,
)
from rarn.nas.loop import SearchData, run_search
from rarn.nas.search import RACLSearch
from rarn.space.genotype import GENOTYPES, Genotype, edge_endpoints
from rarn.space.ops import PARAMETRIC, PRIMITIVES

RACL = GENOTYPES["RACL"]
CONVS = sorted(PARAMETRIC)
CONCAT = (2, 3, 4, 5)


def _cell(ops: list[str]) -> tuple[tuple[str, int], ...]:
    """Two edges per node from inputs 0 and 1."""
    return tuple((op, k % 2) for k, op in enumerate(ops))


@pytest.fixture(scope="module")
def search() -> RACLSearch:
    cfg = SearchConfig(batch_size=8, init_channels=8, layers=5, nodes=4, seed=0)
    return RACLSearch(cfg, ConstraintConfig(), num_classes=10, in_channels=3)


def test_published_genotypes_do_not_collapse(search):
    log_lam = cell_log_lipschitz(search.model)
    for name, g in GENOTYPES.items():
        report = detect_collapse(g, log_lam)
        assert not report.collapsed, (name, report.reason)


def test_parameter_free_normal_cell_trips():
    normal = _cell(["skip_connect"] * 4 + ["max_pool_3x3", "avg_pool_3x3"] + CONVS[:2])
    report = detect_collapse(Genotype(normal, CONCAT, RACL.reduce, CONCAT))
    assert report.param_free_share["normal"] == 0.75
    assert report.collapsed and len(report.reasons) == 1
    assert "6/8 edges parameter-free" in report.reason
    # the same share in the reduction cell is DARTS V2's reduction cell: not judged
    assert not detect_collapse(Genotype(RACL.normal, CONCAT, normal, CONCAT)).collapsed


def test_one_op_dominating_a_cell_trips():
    reduce = _cell(["dil_conv_3x3"] * 6 + ["sep_conv_3x3", "skip_connect"])
    report = detect_collapse(Genotype(RACL.normal, CONCAT, reduce, CONCAT))
    assert report.dominant_op["reduce"] == ("dil_conv_3x3", 0.75)
    assert report.collapsed and len(report.reasons) == 1
    assert "reduce cell dil_conv_3x3 on 6/8 edges" in report.reason
    almost = _cell(["dil_conv_3x3"] * 5 + ["sep_conv_3x3"] * 3)
    assert not detect_collapse(Genotype(RACL.normal, CONCAT, almost, CONCAT)).collapsed


def _lambda_table(seed: int) -> torch.Tensor:
    """Random ``[14, n_ops]`` log-constants: skip cheapest, a different cheapest conv per edge."""
    g = torch.Generator().manual_seed(seed)
    t = 2 + torch.rand(14, len(PRIMITIVES), generator=g)
    t[:, PRIMITIVES.index("none")] = float("-inf")
    t[:, PRIMITIVES.index("skip_connect")] = 0.0
    for e in range(14):
        t[e, PRIMITIVES.index(CONVS[e % 4])] = 1.0
    return t


def test_genotype_equal_to_the_lambda_ranking_trips():
    """Every edge on its lowest-lambda convolution, no op dominating: only the ranking trips."""
    log_lam = {"normal": _lambda_table(0), "reduce": _lambda_table(1)}
    ends = edge_endpoints(4)
    pairs = [(CONVS[ends.index((k % 2, k // 2 + 2)) % 4], k % 2) for k in range(8)]
    g = Genotype(tuple(pairs), CONCAT, tuple(pairs), CONCAT)
    assert lambda_ranking_share(g, log_lam, tuple(CONVS)) == 1.0
    assert lambda_ranking_share(g, log_lam, tuple(p for p in PRIMITIVES if p != "none")) == 0.0
    report = detect_collapse(g, log_lam)
    assert max(s for _, s in report.dominant_op.values()) < 0.75
    assert report.lambda_ranking == 1.0 and len(report.reasons) == 1
    assert "lowest-Lipschitz op of their edge (among convolutions)" in report.reason
    assert not detect_collapse(g, log_lam, CollapseLimits(lambda_ranking=1.0 + 1e-9)).collapsed


def _push(search: RACLSearch, cell: str, winners: list[int]) -> None:
    """Architecture means with op ``winners[e]`` far ahead on every edge ``e`` of ``cell``."""
    with torch.no_grad():
        mu = getattr(search.model.arch, f"mu_{cell}")
        mu.zero_()
        mu[torch.arange(len(winners)), torch.tensor(winners)] = 5.0


def test_architecture_parameters_on_the_lambda_ranking_trip(search):
    """Means pushed to each edge's lowest-lambda conv (what an over-weighted constraint does)
    decode to a genotype the detector calls the constraint's ranking."""
    log_lam = cell_log_lipschitz(search.model)
    convs = [PRIMITIVES.index(p) for p in CONVS]
    for cell in ("normal", "reduce"):
        best = log_lam[cell][:, convs].argmin(1)
        _push(search, cell, [convs[int(i)] for i in best])
    report = detect_collapse(search.decode("median"), log_lam)
    assert report.lambda_ranking == 1.0 and report.collapsed, report


def test_architecture_parameters_on_skip_trip(search):
    skip = PRIMITIVES.index("skip_connect")
    _push(search, "normal", [skip] * 14)
    _push(search, "reduce", [PRIMITIVES.index(CONVS[e % 4]) for e in range(14)])
    g = search.decode("median")
    assert all(op == "skip_connect" for op, _ in g.normal)
    report = detect_collapse(g)
    assert report.param_free_share["normal"] == 1.0 and report.collapsed
    assert report.metrics()["collapsed"] == 1.0


def test_metrics_are_flat_floats():
    m = detect_collapse(RACL, {"normal": _lambda_table(0), "reduce": _lambda_table(1)}).metrics()
    assert set(m) == {
        "collapse_param_free_share_normal",
        "collapse_param_free_share_reduce",
        "collapse_dominant_op_share",
        "collapse_lambda_ranking",
        "collapsed",
    }
    assert all(isinstance(v, float) for v in m.values())
    assert PARAMETER_FREE == {"skip_connect", "max_pool_3x3", "avg_pool_3x3"}


def test_darts_plus_early_stop_freezes_the_architecture(tmp_path):
    """A normal cell decoded all-skip after the first architecture epoch stops architecture
    updates for the rest of the search (and after a resume); the result says it collapsed."""
    data = SearchData.from_bundle(load_dataset(DataConfig(name="digits", limit=200)), 0.5, 0)
    cfg = SearchConfig(
        epochs=3, warmup_epochs=1, batch_size=16, init_channels=8, layers=3, nodes=2,
        max_steps_per_epoch=2, arch_lr=6e-3, arch_stop_param_free=0.5, decode_n=16, seed=0,
        decode_estimate="first_order", robust_eval_n=16, robust_eval_steps=2,  # plumbing: cheap
    )  # fmt: skip
    s = RACLSearch(cfg, ConstraintConfig(), num_classes=10, in_channels=1)
    _push(s, "normal", [PRIMITIVES.index("skip_connect")] * 5)
    s.save(tmp_path)  # epoch 0 with these means: run_search resumes from it
    result = run_search(cfg, ConstraintConfig(), data, checkpoint_dir=tmp_path)
    steps = [m["arch_steps"] for m in result.history]
    stopped = [m["arch_stopped"] for m in result.history]
    assert steps == [0.0, 2.0, 0.0] and stopped == [0.0, 1.0, 1.0]
    assert result.collapsed and "parameter-free" in result.collapse_reason
    longer = dataclasses.replace(cfg, epochs=4)
    resumed = run_search(longer, ConstraintConfig(), data, checkpoint_dir=tmp_path)
    assert resumed.history[-1]["arch_steps"] == 0.0 and resumed.history[-1]["arch_stopped"] == 1.0


@pytest.mark.parametrize(
    "field, value",
    [
        ("collapse_param_free_limit", 0.0),
        ("collapse_dominant_limit", 1.5),
        ("collapse_lambda_limit", -0.1),
        ("arch_stop_param_free", 1.01),
        ("grad_norm_every", 0),
    ],
)
def test_collapse_and_remedy_fields_are_range_checked(field, value):
    with pytest.raises(ConfigError, match=f"search.{field}"):
        check(dataclasses.replace(SearchConfig(), **{field: value}))
