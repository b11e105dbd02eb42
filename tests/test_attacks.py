"""Tests of rarn.robust.attacks: every registered attack on a tiny conv net trained on sklearn
digits."""

from __future__ import annotations

import inspect
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from rarn.models.common import eval_mode
from rarn.robust.attacks import ATTACK_IMPL, ATTACK_NORM, ATTACKS, AttackSpec, get_attack
from rarn.robust.attacks.black_box import _square_p
from rarn.robust.attacks.registry import attack_spec, register_attack

EPS = {"linf": 0.1, "l2": 1.0}  # digits are 8x8 in [0, 1]; 8/255 would be too small to matter
NEEDS = {  # attack -> the optional distribution it imports
    "autoattack": "pyautoattack",
    "autoattack_l2": "pyautoattack",
    "autoattack_torchattacks": "torchattacks",
    "pgd_torchattacks": "torchattacks",
}
FAST = [a for a in ATTACKS if not a.startswith("autoattack")]  # AutoAttack: its own tests
EXTRA = {"square": {"steps": 100}, "pgd_eot": {"samples": 2}}  # queries; EOT passes per step
AUTOATTACKS = ["autoattack", "autoattack_torchattacks"]  # the reference, torchattacks' assembly


@pytest.fixture(scope="module")
def digits(digits_net_trainer):
    return digits_net_trainer()


def _run(name, model, x, y, seed=0, **kw):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    eps = EPS[ATTACK_NORM[name]]
    params = {"eps": eps, "step_size": eps / 4, "steps": 10, **EXTRA.get(name, {}), **kw}
    return get_attack(name)(model, x, y, generator=torch.Generator().manual_seed(seed), **params)


def _acc(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_registry_metadata_covers_every_attack():
    assert set(ATTACK_NORM) == set(ATTACKS) == set(ATTACK_IMPL)
    assert ATTACK_IMPL["pgd"][0] == "rarn"
    assert ATTACK_IMPL["autoattack"][0] == "pyautoattack"  # Croce and Hein's reference code
    assert ATTACK_IMPL["autoattack_torchattacks"][0] == "torchattacks"


def test_registry_is_one_record_per_attack():
    spec = attack_spec("pgd_l2")
    assert (spec.fn, spec.norm) == (ATTACKS["pgd_l2"], ATTACK_NORM["pgd_l2"])
    assert (spec.implementation, spec.version) == ATTACK_IMPL["pgd_l2"]
    assert not attack_spec("square").white_box and attack_spec("pgd").white_box
    assert attack_spec("fgsm").effective_steps({"steps": 7}) == 1
    assert attack_spec("autoattack").effective_steps({"steps": 7}) == 100
    assert attack_spec("autoattack").effective_steps({"steps": 7, "n_iter": 5}) == 5
    with pytest.raises(ValueError, match="already registered"):
        register_attack(AttackSpec("pgd", spec.fn, "linf", implementation="x", version="0"))
    with pytest.raises(TypeError):
        ATTACKS["mine"] = spec.fn  # the views are read-only


def test_unknown_attack_lists_known_names():
    with pytest.raises(KeyError, match="known:.*pgd"):
        get_attack("pgd_inf")


@pytest.mark.parametrize("name", FAST)
def test_stays_in_ball_and_in_range(name, digits):
    model, x, y = digits
    x, y = x[:64], y[:64]
    x_adv = _run(name, model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    eps = EPS[ATTACK_NORM[name]]
    d = (x_adv - x).flatten(1)
    dist = d.abs().amax(1) if ATTACK_NORM[name] == "linf" else d.norm(dim=1)
    assert dist.max() <= eps * (1 + 1e-5)
    assert dist.max() > 0  # it did something


@pytest.mark.parametrize("name", FAST)
def test_robust_accuracy_not_above_clean(name, digits):
    model, x, y = digits
    x, y = x[:128], y[:128]
    clean = _acc(model, x, y)
    robust = _acc(model, _run(name, model, x, y), y)
    assert robust <= clean
    assert robust < clean - 0.1  # eps = 0.1 hurts a naturally trained net


@pytest.mark.parametrize("name", FAST)
def test_deterministic_under_fixed_generator(name, digits):
    model, x, y = digits
    x, y = x[:32], y[:32]
    assert torch.equal(_run(name, model, x, y, seed=3), _run(name, model, x, y, seed=3))


@pytest.mark.parametrize("name", ["pgd", "pgd_l2", "cw", "square", "pgd_torchattacks"])
def test_random_attacks_depend_on_the_seed(name, digits):
    model, x, y = digits
    x, y = x[:32], y[:32]
    assert not torch.equal(_run(name, model, x, y, seed=1), _run(name, model, x, y, seed=2))


@pytest.mark.parametrize("name", FAST)
def test_global_rng_untouched(name, digits):
    model, x, y = digits
    state = torch.get_rng_state()
    _run(name, model, x[:16], y[:16])
    assert torch.equal(state, torch.get_rng_state())


def _mixed_mode_model():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(4 * 64, 10),
    )
    model.train()
    model[1].eval()  # a deliberately frozen BatchNorm must stay frozen
    model[0].bias.requires_grad_(False)  # and a frozen parameter must stay frozen
    return model


@pytest.mark.parametrize("name", FAST)
def test_restores_modes_and_requires_grad(name):
    model = _mixed_mode_model()
    before = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    stats = model[1].running_mean.clone()
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8)
    _run(name, model, x, y)
    assert [m.training for m in model.modules()] == before
    assert [p.requires_grad for p in model.parameters()] == grads
    assert torch.equal(stats, model[1].running_mean)  # eval mode: BN statistics untouched
    assert all(p.grad is None for p in model.parameters())


def test_eval_mode_restores_on_error():
    model = _mixed_mode_model()
    before = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not any(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == before
    assert model[0].weight.requires_grad and not model[0].bias.requires_grad


def test_works_under_no_grad_and_on_empty_batch(digits):
    model, x, y = digits
    with torch.no_grad():
        x_adv = _run("pgd", model, x[:8], y[:8])
    assert (x_adv - x[:8]).abs().max() > 0
    empty = _run("pgd", model, x[:0], y[:0])
    assert empty.shape == (0, 1, 8, 8)


def test_fgsm_ignores_steps_and_step_size(digits):
    model, x, y = digits
    a = _run("fgsm", model, x[:16], y[:16], steps=1, step_size=0.01)
    b = _run("fgsm", model, x[:16], y[:16], steps=7, step_size=0.5)
    assert torch.equal(a, b)
    assert torch.allclose((a - x[:16]).abs().amax(), torch.tensor(0.1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": 0.0}, "eps must be a finite number > 0"),
        ({"eps": -0.1}, "eps must be a finite number > 0"),
        ({"eps": math.nan}, "eps must be a finite number > 0"),
        ({"eps": math.inf}, "eps must be a finite number > 0"),
        ({"steps": 0}, "steps must be an int >= 1"),
        ({"steps": 2.5}, "steps must be an int >= 1"),
        ({"step_size": 0.0}, "step_size must be a finite number > 0"),
        ({"x": torch.full((2, 1, 8, 8), 1.5)}, r"x must lie in \[0, 1\]"),
        ({"x": torch.full((2, 1, 8, 8), -0.1)}, r"x must lie in \[0, 1\]"),
        ({"x": torch.full((2, 1, 8, 8), math.nan)}, r"x must lie in \[0, 1\]"),
        ({"x": torch.rand(2, 64)}, "NCHW"),
        ({"y": torch.zeros(3, dtype=torch.long)}, "batch size"),
        ({"y": torch.zeros(2)}, "integer"),
    ],
)
@pytest.mark.parametrize("name", ["fgsm", "pgd", "square"])
def test_bad_arguments_raise(name, kwargs, match):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    args = {"x": torch.rand(2, 1, 8, 8), "y": torch.zeros(2, dtype=torch.long)}
    args |= {k: kwargs[k] for k in ("x", "y") if k in kwargs}
    params = {"eps": 0.1, "step_size": 0.02, "steps": 3}
    params |= {k: v for k, v in kwargs.items() if k not in ("x", "y")}
    with pytest.raises(ValueError, match=match):
        get_attack(name)(model, args["x"], args["y"], **params)


def test_pgd_agrees_with_torchattacks(digits):
    """Same algorithm, other random starts: robust accuracy within ~2 points, ours not weaker."""
    pytest.importorskip("torchattacks")
    model, x, y = digits  # 497 held-out digits
    params = {"eps": 0.1, "step_size": 0.025, "steps": 10}
    ours = _acc(model, _run("pgd", model, x, y, **params), y)
    theirs = _acc(model, _run("pgd_torchattacks", model, x, y, **params), y)
    assert 0.2 < theirs < 0.8  # a regime where the comparison means something
    assert abs(ours - theirs) <= 0.03
    assert ours <= theirs + 0.02


@pytest.mark.parametrize("name", AUTOATTACKS)
def test_autoattack_small(digits, name):
    """Standard AutoAttack, both implementations, shortened budgets, 32 points."""
    model, x, y = digits
    x, y = x[:32], y[:32]
    state = torch.get_rng_state()
    x_adv = _run(name, model, x, y, n_iter=20, n_queries=300)
    assert torch.equal(state, torch.get_rng_state())
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    # At least as strong as PGD-10 (it contains APGD-CE and more), up to one point of noise.
    assert _acc(model, x_adv, y) <= _acc(model, _run("pgd", model, x, y), y) + 1 / 32


def test_rarn_imports_without_torchattacks():
    code = (
        "import sys, rarn.robust.attacks, rarn.robust.evaluation; "
        "assert 'torchattacks' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _rgb_net():
    """A random 3-channel conv net: channels-last strides only differ from contiguous for C > 1."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)
        ).eval()


@pytest.mark.parametrize("name", AUTOATTACKS)
def test_autoattack_takes_channels_last_inputs(name):
    """FAB reshapes inputs and gradients with .view: channels-last strides used to crash it.
    eps is tiny so that APGD-CE/APGD-T leave points for FAB-T and Square."""
    pytest.importorskip(NEEDS[name])
    model = _rgb_net()
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = model(x).argmax(1).detach()
    x_cl = x.to(memory_format=torch.channels_last)
    assert not x_cl.is_contiguous()
    g = torch.Generator().manual_seed(0)
    kw = {"eps": 1e-3, "step_size": 1.0, "steps": 1, "n_iter": 3, "n_queries": 10}
    x_adv = get_attack(name)(model, x_cl, y, generator=g, **kw)
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= 1e-3 + 1e-6


def test_autoattack_square_uses_the_reference_schedule(digits, monkeypatch):
    """The reference AutoAttack builds Square with resc_schedule=False (torchattacks: True)."""
    ta = pytest.importorskip("torchattacks")
    seen = {}
    real = ta.Square

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ta, "Square", spy)
    model, x, y = digits
    _run("autoattack_torchattacks", model, x[:8], y[:8], n_iter=2, n_queries=5)
    assert seen["resc_schedule"] is False and seen["n_queries"] == 5


def test_autoattack_refuses_other_versions(digits):
    model, x, y = digits
    with pytest.raises(ValueError, match="standard"):
        _run("autoattack_torchattacks", model, x[:4], y[:4], version="rand")
    with pytest.raises(ValueError, match="standard"):
        _run("autoattack", model, x[:4], y[:4], version="plus")


def test_square_schedule_is_not_rescaled_by_default(digits):
    """p at query 100 of 500: the 10,000-query schedule as is gives p_init / 4; rescaled, the
    query counts as 2,000 of 10,000: p_init / 32."""
    assert _square_p(0.8, 100, 500) == pytest.approx(0.8 / 4)
    assert _square_p(0.8, 100, 500, rescale=True) == pytest.approx(0.8 / 32)
    assert _square_p(0.8, 9000, 10000) == _square_p(0.8, 9000, 10000, rescale=True)
    assert inspect.signature(get_attack("square")).parameters["rescale"].default is False
    model, x, y = digits
    a = _run("square", model, x[:32], y[:32], steps=100)
    b = _run("square", model, x[:32], y[:32], steps=100, rescale=True)
    assert not torch.equal(a, b)


def test_spec_settings_include_the_defaults():
    """What the per-image records store: every keyword argument, defaults included."""
    budget = {"eps": 0.1, "step_size": 0.02, "steps": 5}
    assert attack_spec("mim").settings(budget) == {**budget, "decay": 1.0, "random_start": False}
    assert attack_spec("cw").settings({**budget, "kappa": 5.0})["kappa"] == 5.0
    assert attack_spec("cw").settings(budget)["kappa"] == math.inf
    assert attack_spec("square").settings(budget)["rescale"] is False
    aa = attack_spec("autoattack")
    assert aa.settings(budget)["version"] == "standard" and aa.settings(budget)["n_queries"] == 5000
    assert aa.black_box_part and not attack_spec("pgd").black_box_part


def test_reference_and_torchattacks_autoattack_agree_on_a_cifar_shaped_model():
    """Both AutoAttack implementations on a 3x32x32 conv net (24 images labelled by the net,
    eps 2/255, shortened budgets): the robust accuracies agree within their 95 % intervals and
    the paired test on the same images finds no difference (measured: identical, 37.5 % at 40)."""
    from rarn.robust.evaluation import paired_test, wilson_interval

    pytest.importorskip("pyautoattack")
    pytest.importorskip("torchattacks")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(16 * 64, 10),
        ).eval()  # fmt: skip
    x = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = net(x).argmax(1).detach()
    kw = {"eps": 2 / 255, "step_size": 1.0, "steps": 1, "n_iter": 10, "n_queries": 100}
    robust = {}
    for name in AUTOATTACKS:
        x_adv = get_attack(name)(net, x, y, generator=torch.Generator().manual_seed(0), **kw)
        with torch.no_grad():
            robust[name] = net(x_adv).argmax(1) == y
    a, b = robust["autoattack"], robust["autoattack_torchattacks"]
    assert 0.1 < float(a.float().mean()) < 0.9  # a regime where the comparison means something
    (lo_a, hi_a), (lo_b, hi_b) = (
        wilson_interval(int(a.sum()), 24),
        wilson_interval(int(b.sum()), 24),
    )
    assert lo_a <= hi_b and lo_b <= hi_a
    assert paired_test(a, b).p_a_better > 0.05 and paired_test(b, a).p_a_better > 0.05


@pytest.mark.parametrize(
    ("name", "kw"), [("autoattack_l2", {"eps": 1.0}), ("autoattack", {"version": "rand"})]
)
def test_reference_autoattack_l2_and_rand(digits, name, kw):
    """The reference's L2 threat model and its rand version (APGD-CE/DLR with EOT), small
    budgets: inside the ball, at least as strong as nothing, components recorded."""
    from rarn.robust.attacks import recording_components

    pytest.importorskip("pyautoattack")
    model, x, y = digits
    x, y = x[:16], y[:16]
    params = {"eps": 0.1, "step_size": 1.0, "steps": 1, "n_iter": 5, "n_queries": 20, **kw}
    with recording_components() as comps:
        x_adv = get_attack(name)(model, x, y, generator=torch.Generator(), **params)
    norm = (x_adv - x).flatten(1).norm(dim=1) if name.endswith("l2") else (x_adv - x).abs()
    assert norm.max() <= params["eps"] + 1e-5 and 0 <= x_adv.min() and x_adv.max() <= 1
    fooled = (model(x_adv).argmax(1) != y) & (model(x).argmax(1) == y)
    assert fooled.any() and len(comps) == 1
    rand = kw.get("version") == "rand"
    allowed = {"apgd-ce", "apgd-dlr"} if rand else {"apgd-ce", "apgd-t", "fab-t", "square"}
    assert {comps[0][i] for i in fooled.nonzero().squeeze(1).tolist()} <= allowed
