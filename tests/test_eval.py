import numpy as np
import pytest

from studio.errors import StudioError
from studio.eval import features, frechet_distance, score
from studio.toy.evaluator import ATTRIBUTES
from studio.toy.pretrain import render_dataset
from studio.toy.render import SHAPES


@pytest.fixture(scope="module")
def fresh_renders():
    # A seed the evaluator never trained on (it used seed 1), every shape, some 0 / 2+ object scenes.
    return render_dataset(1500, seed=12345, shapes=SHAPES, multi_object_share=0.15)


def test_evaluator_accuracy_on_fresh_renders(fresh_renders):
    data = fresh_renders
    expected = []
    for i in range(len(data["images"])):
        row = {}
        for name, values in ATTRIBUTES.items():
            label = data["labels"][name][i]
            if label >= 0:
                row[name] = values[label]
        expected.append(row)
    accuracy = score(data["images"], expected).accuracy()
    assert set(accuracy) == set(ATTRIBUTES)
    for name, value in accuracy.items():
        assert value >= 0.97, f"{name} accuracy {value:.3f} < 0.97"


def test_heldout_shapes_are_recognised(fresh_renders):
    data = fresh_renders
    for shape in ("star", "heart"):
        idx = np.flatnonzero(data["labels"]["shape"] == list(SHAPES).index(shape))
        table = score(data["images"][idx])
        assert table.rate("shape", shape) >= 0.97


def test_frechet_distance_separates_distributions(fresh_renders):
    images = fresh_renders["images"]
    a, b = features(images[:600]), features(images[600:1200])
    only_circles = features(render_dataset(600, seed=999, shapes=("circle",))["images"])
    assert abs(frechet_distance(a, a)) < 1e-3
    # Two samples of one distribution are far closer than a sample of another (all circles).
    assert frechet_distance(a, b) < frechet_distance(a, only_circles) / 5


def test_score_table_errors_name_the_input():
    img = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(StudioError, match="unknown color 'teal'"):
        score([img], [{"color": "teal"}])
    with pytest.raises(StudioError, match="1 images but 2 expectations"):
        score([img], [{}, {}])
