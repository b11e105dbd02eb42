import json

import pytest
import torch

from rarn.nas.decode import derive_genotype
from rarn.space.genotype import GENOTYPES, Genotype, get_genotype, parametric_share
from rarn.space.ops import PRIMITIVES


@pytest.mark.parametrize("name", sorted(GENOTYPES))
def test_json_round_trip(name, tmp_path):
    g = GENOTYPES[name]
    assert Genotype.from_json(g.to_json()) == g
    assert Genotype.from_dict(json.loads(json.dumps(g.to_dict()))) == g
    p = tmp_path / "g.json"
    p.write_text(g.to_json())
    assert get_genotype(str(p)) == g
    assert len(g.sha256()) == 64
    with pytest.raises(AttributeError):
        g.normal = ()


def test_racl_genotype_is_the_published_one():
    g = GENOTYPES["RACL"]
    assert g.normal[:4] == (
        ("sep_conv_3x3", 0),
        ("sep_conv_3x3", 1),
        ("sep_conv_5x5", 0),
        ("skip_connect", 1),
    )
    assert parametric_share(g) == 12 / 16


@pytest.mark.parametrize(
    "normal, match",
    [
        ([("conv_7x7", 0), ("skip_connect", 1)], "unknown op 'conv_7x7'"),
        ([("none", 0), ("skip_connect", 1)], "unknown op 'none'"),
        ([("skip_connect", 2), ("skip_connect", 1)], "cannot take input 2"),
        ([("skip_connect", 0)], "2 \\(op, input\\) pairs"),
    ],
)
def test_validation_errors(normal, match):
    with pytest.raises(ValueError, match=match):
        Genotype(normal, (2,), [("skip_connect", 0), ("skip_connect", 1)], (2,))


def test_unknown_name_lists_known():
    with pytest.raises(KeyError, match="RACL"):
        get_genotype("NOPE")
    with pytest.raises(ValueError, match="not a valid genotype"):
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            f.write('{"normal": 1}')
        get_genotype(f.name)


def test_derive_never_picks_none_and_keeps_two_inputs():
    E, O = 14, len(PRIMITIVES)
    scores = torch.full((E, O), -10.0)
    scores[:, PRIMITIVES.index("none")] = 10.0  # none dominates everywhere
    scores[:, PRIMITIVES.index("dil_conv_5x5")] = 0.0
    edges = torch.rand(E, generator=torch.Generator().manual_seed(0))
    g = derive_genotype(scores, edges, scores, edges, 4)
    assert all(op == "dil_conv_5x5" for op, _ in g.normal + g.reduce)
    for cell in (g.normal, g.reduce):
        for j in range(4):
            inputs = [i for _, i in cell[2 * j : 2 * j + 2]]
            assert len(set(inputs)) == 2 and max(inputs) < j + 2


def test_derive_picks_strongest_edges():
    E, O = 14, len(PRIMITIVES)
    scores = torch.zeros(E, O)
    edges = torch.full((E,), 0.1)
    edges[0] = edges[1] = 0.9  # node 2 keeps inputs 0,1 (its only ones)
    edges[2 + 2] = edges[2 + 0] = 0.9  # node 3: inputs 0 and 2
    g = derive_genotype(scores, edges, scores, edges, 4)
    assert [i for _, i in g.normal[2:4]] == [0, 2]
    with pytest.raises(ValueError, match="expected shape"):
        derive_genotype(scores[:3], edges, scores, edges, 4)
