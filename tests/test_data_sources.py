"""Training input sources: an image folder and ArrayRecord shards, alone and through train_dataset."""

import json

import numpy as np
import pytest
from PIL import Image

from starflow_jax.data.array_record import TRAIN_STEP_KEYS, ArrayRecordSource, write_shards
from starflow_jax.data.image_folder import ImageFolderSource
from starflow_jax.data.pipeline import train_dataset

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _thirds(size, colours, vertical=False):
    """An RGB image whose left/middle/right (or top/middle/bottom) thirds have the given colours."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    for k, c in enumerate(colours):
        if vertical:
            a[k * h // 3 : (k + 1) * h // 3] = c
        else:
            a[:, k * w // 3 : (k + 1) * w // 3] = c
    return Image.fromarray(a)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    for name in ("cats", "birds", "dogs"):
        (root / name).mkdir(parents=True)
    _thirds((90, 30), (RED, GREEN, BLUE)).save(root / "birds" / "wide.png")
    _thirds((20, 60), (BLUE, RED, GREEN), vertical=True).save(root / "birds" / "tall.PNG")
    Image.fromarray(np.full((17, 23), 128, np.uint8), "L").save(root / "cats" / "grey.png")
    Image.new("RGB", (40, 32), (10, 200, 30)).save(root / "cats" / "b.jpg", quality=95)
    Image.new("RGBA", (12, 12), (255, 255, 255, 0)).save(root / "dogs" / "rgba.png")
    Image.new("RGB", (9, 14), (0, 0, 255)).save(root / "dogs" / "z.jpeg")
    (root / "dogs" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root


def test_image_folder_records(folder):
    src = ImageFolderSource(folder, image_size=8)
    assert src.classes == ["birds", "cats", "dogs"] and src.num_classes == 3 and len(src) == 6
    names = [p.name for p, _ in src.samples]
    assert names == ["tall.PNG", "wide.png", "b.jpg", "grey.png", "rgba.png", "z.jpeg"]
    for i in range(len(src)):
        r = src[i]
        assert set(r) == {"image", "label"}
        assert r["image"].shape == (3, 8, 8) and r["image"].dtype == np.float32
        assert r["image"].min() >= -1.0 and r["image"].max() <= 1.0
        assert r["label"].dtype == np.int32 and int(r["label"]) == [0, 0, 1, 1, 2, 2][i]
    grey = src[3]["image"]
    np.testing.assert_allclose(grey, 128 / 127.5 - 1, atol=1e-6)  # L -> RGB: three equal channels
    np.testing.assert_allclose(src[2]["image"][:, 4, 4], np.array([10, 200, 30]) / 127.5 - 1, atol=0.05)
    mono = ImageFolderSource(folder, image_size=5, channels=1)
    assert mono[1]["image"].shape == (1, 5, 5)


def test_image_folder_centre_crop(folder):
    src = ImageFolderSource(folder, image_size=12)
    green = np.array(GREEN, np.float32)[:, None, None] / 127.5 - 1
    wide = src[1]["image"]  # 90x30 -> 36x12 -> columns 12..23: the green middle third
    np.testing.assert_allclose(wide[:, :, 2:10], np.broadcast_to(green, (3, 12, 8)), atol=0.02)
    assert np.abs(wide - green).mean() < 0.15
    tall = src[0]["image"]  # 20x60 -> 12x36 -> rows 12..23: the red middle third
    red = np.array(RED, np.float32)[:, None, None] / 127.5 - 1
    np.testing.assert_allclose(tall[:, 2:10, :], np.broadcast_to(red, (3, 8, 12)), atol=0.02)


def test_image_folder_errors(tmp_path, folder):
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderSource(tmp_path / "nope", 8)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolderSource(tmp_path / "flat", 8)
    (folder / "empty").mkdir()
    (folder / "empty" / "readme.md").write_text("-")
    with pytest.raises(ValueError, match="empty has no images"):
        ImageFolderSource(folder, 8)
    (folder / "empty" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    src = ImageFolderSource(folder, 8)
    with pytest.raises(ValueError, match="broken.png"):
        src[[p.name for p, _ in src.samples].index("broken.png")]
    with pytest.raises(ValueError, match="image_size"):
        ImageFolderSource(folder, 0)
    with pytest.raises(ValueError, match="channels"):
        ImageFolderSource(folder, 8, channels=4)


def _records(n=10):
    rng = np.random.default_rng(0)
    return [
        {
            "latent": rng.normal(size=(4, 2, 2)).astype(np.float32),
            "text_emb": rng.normal(size=(3, 5)).astype(np.float32),
            "caption": f"caption {i} " + "é" * (i % 3),
            "size": np.array([16, 16 + i], np.int32),
        }
        for i in range(n)
    ]


def test_array_record_round_trip(tmp_path):
    records = _records()
    shards = write_shards(tmp_path / "ar", iter(records), records_per_shard=4)
    assert [p.name for p in shards] == [f"shard-0000{i}-of-00003.array_record" for i in range(3)]
    index = json.loads((tmp_path / "ar" / "index.json").read_text())
    assert index["num_records"] == 10 and [s["num_records"] for s in index["shards"]] == [4, 4, 2]
    assert index["fields"]["latent"] == {"shape": [4, 2, 2], "dtype": "float32"}
    for src in (ArrayRecordSource(tmp_path / "ar"), ArrayRecordSource([str(p) for p in shards])):
        assert len(src) == 10
        for i in [7, 0, 9, 3, 4, 8, 1]:  # random access across shards
            r, want = src[i], records[i]
            assert set(r) == set(want)
            for k in ("latent", "text_emb", "size"):
                assert r[k].dtype == want[k].dtype and r[k].tobytes() == want[k].tobytes()
            assert str(r["caption"]) == want["caption"]
    step = ArrayRecordSource(tmp_path / "ar", fields=["latent", "text_emb"], rename=TRAIN_STEP_KEYS)
    assert set(step[2]) == {"image", "cond"} and np.array_equal(step[2]["cond"], records[2]["text_emb"])


def test_array_record_write_refusals(tmp_path):
    out = tmp_path / "ar"
    write_shards(out, _records(3), records_per_shard=2)
    with pytest.raises(FileExistsError):
        write_shards(out, _records(3))
    (out / "notes.txt").write_text("mine")
    shards = write_shards(out, _records(5), records_per_shard=5, overwrite=True)
    assert [p.name for p in shards] == ["shard-00000-of-00001.array_record"]
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "notes.txt", shards[0].name]
    assert len(ArrayRecordSource(out)) == 5
    with pytest.raises(ValueError, match="no records"):
        write_shards(tmp_path / "none", [])
    with pytest.raises(ValueError, match="fields"):
        write_shards(tmp_path / "mixed", [{"a": 1}, {"b": 2}])
    with pytest.raises(ValueError, match="object"):
        write_shards(tmp_path / "obj", [{"a": np.array([1, "x", None], dtype=object)}])
    assert not [p for p in (tmp_path / "mixed").iterdir()]  # a failed write leaves nothing behind


def test_array_record_read_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ArrayRecordSource(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.array_record shards"):
        ArrayRecordSource(tmp_path / "empty")
    out = tmp_path / "ar"
    write_shards(out, _records(6), records_per_shard=4)
    index = json.loads((out / "index.json").read_text())
    index["shards"][1]["num_records"] = 3
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="disagrees with the shards"):
        ArrayRecordSource(out)
    (out / "shard-00001-of-00002.array_record").unlink()
    with pytest.raises(ValueError, match="disagrees"):
        ArrayRecordSource(out)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "shard-00000-of-00001.array_record").write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="shard-00000-of-00001.array_record"):
        ArrayRecordSource(tmp_path / "junk")


def _check_pipeline(src, keys_shapes):
    """Batches have the expected keys / shapes; 2 processes' rows together = the 1-process batch."""
    whole = train_dataset(src, global_batch=4, seed=0, process_index=0, process_count=1)
    halves = [train_dataset(src, global_batch=4, seed=0, process_index=i, process_count=2) for i in range(2)]
    for b in range(3):  # crosses an epoch boundary for the image folder
        g = whole[b]
        assert {k: v.shape for k, v in g.items()} == keys_shapes
        for k in g:
            parts = np.concatenate([h[b][k] for h in halves])
            assert np.array_equal(parts, g[k])
    it = iter(whole.to_iter_dataset())
    next(it)
    state = it.get_state()
    second = next(it)
    it2 = iter(whole.to_iter_dataset())
    it2.set_state(state)
    assert all(np.array_equal(second[k], v) for k, v in next(it2).items())


def test_train_dataset_over_sources(tmp_path, folder):
    _check_pipeline(ImageFolderSource(folder, image_size=8), {"image": (4, 3, 8, 8), "label": (4,)})
    write_shards(tmp_path / "ar", _records(), records_per_shard=4)
    _check_pipeline(
        ArrayRecordSource(tmp_path / "ar"),
        {"latent": (4, 4, 2, 2), "text_emb": (4, 3, 5), "caption": (4,), "size": (4, 2)},
    )
    _check_pipeline(
        ArrayRecordSource(tmp_path / "ar", fields=["latent", "text_emb"], rename=TRAIN_STEP_KEYS),
        {"image": (4, 4, 2, 2), "cond": (4, 3, 5)},
    )


def test_digits_at_the_model_size_and_as_captions():
    """data.name='digits' for a model of other size / channels (a latent stand-in) and,
    text-conditioned, with a fixed embedding per class as each record's caption."""
    from starflow_jax.config import load_config
    from starflow_jax.data.digits import digits_at, load_digits_splits
    from starflow_jax.data.sources import make_data

    tr, _ = load_digits_splits()
    big = digits_at(tr.images[:3], 16, 4)
    assert big.shape == (3, 4, 16, 16) and big.dtype == np.float32
    np.testing.assert_array_equal(big[:, 0, ::2, ::2], tr.images[:3, 0])  # each pixel repeated 2x2
    np.testing.assert_array_equal(big[:, 3], np.roll(big[:, 0], (1, 1), axis=(-2, -1)))
    assert set(np.unique(big)) <= set(np.unique(tr.images))  # the same 17 grey levels
    with pytest.raises(ValueError, match="multiple of 8 pixels"):
        digits_at(tr.images[:1], 12, 4)

    config = load_config("configs/bench_s_digits.py")
    data = make_data(config)
    assert data.num_classes == 0  # records carry captions
    r0, r1 = data.train[0], data.train[1]
    assert r0["image"].shape == (4, 16, 16) and r0["cond"].shape == (8, 32)
    labels = tr.labels
    same = [i for i in range(1, 50) if labels[i] == labels[0]][0]
    np.testing.assert_array_equal(data.train[same]["cond"], r0["cond"])  # one caption per class
    assert labels[1] == labels[0] or not np.allclose(r1["cond"], r0["cond"])
    assert "label" not in r0 and data.heldout[0]["cond"].shape == (8, 32)
