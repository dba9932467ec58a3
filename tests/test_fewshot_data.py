"""Episodic few-shot data: the episode machinery, and every dataset reader on a tiny file it writes
itself in exactly the on-disk format (a few classes of random uint8 images with the real keys and
shapes), so the formats stay right without the datasets. Real data (omniglot-small, the CIFAR-FS
split file) is read from $L2L_ZOO_DATA."""
import hashlib
import io
import json
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot.data import (DATASETS, SMALL_SPLIT, EpisodeSampler, FewShotDataError, FewShotSplit,
                          TaskDatasetSource, episode_generator, load_cifarfs, load_fewshot, load_miniimagenet,
                          load_omniglot, load_omniglot_small, load_tieredimagenet, mean_ci)
from fewshot.data import tieredimagenet as tiered_module
from fewshot.data.registry import channel_stats

SPLITS = ("train", "val", "test")


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No data folder but the ones a test names: $L2L_ZOO_DATA unset, ./data absent."""
    monkeypatch.delenv("L2L_ZOO_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------ episodes

def synthetic_split(C=10, n=8, seed=0):
    """C classes × n images of 1×4×4 whose every pixel is the image's id (0..C·n−1); image id
    i belongs to class i // n; stored in a shuffled order."""
    ids = torch.randperm(C * n, generator=torch.Generator().manual_seed(seed))
    images = ids.to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    return FewShotSplit("train", images, ids // n, [f"class{c}" for c in range(C)])


def ids_of(x):  # images of synthetic_split (mean 0, std 1) back to their ids
    return (x[:, 0, 0, 0] * 255).round().long()


def test_episode_shapes_labels_and_remapping():
    sp = synthetic_split()
    ep = EpisodeSampler(sp, ways=5, shots=2, queries=3).episode(0, 0)
    assert ep.support_x.shape == (10, 1, 4, 4) and ep.query_x.shape == (15, 1, 4, 4)
    assert ep.support_x.dtype == torch.float32
    assert ep.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert ep.query_y.tolist() == [l for l in range(5) for _ in range(3)]
    assert len(set(ep.classes)) == 5 and ep.ways == 5
    # every image carries label l of its split class episode.classes[l]; support and query disjoint
    for x, y in ((ep.support_x, ep.support_y), (ep.query_x, ep.query_y)):
        assert (ids_of(x) // 8).tolist() == [ep.classes[l] for l in y.tolist()]
    assert not set(ids_of(ep.support_x).tolist()) & set(ids_of(ep.query_x).tolist())


def test_episode_normalisation_uses_the_splits_mean_and_std():
    sp = synthetic_split()
    sp = FewShotSplit("t", sp.images, sp.labels, sp.class_names, mean=[0.25], std=[0.5])
    ep = EpisodeSampler(sp, 2, 1, 1).episode(3, 4)
    ids = (ep.support_x * 0.5 + 0.25).mul(255).round().long()[:, 0, 0, 0]
    assert (ids // 8).tolist() == list(ep.classes)
    want = (ids.double().view(-1, 1, 1, 1).expand(-1, 1, 4, 4) / 255 - 0.25) / 0.5
    assert torch.allclose(ep.support_x.double(), want, atol=1e-6, rtol=0)


def test_same_seed_and_index_give_the_same_episode_and_others_differ():
    sp = synthetic_split()
    a, b = EpisodeSampler(sp, 5, 2, 3), EpisodeSampler(synthetic_split(), 5, 2, 3)
    e1, e2 = a.episode(0, 7), b.episode(0, 7)
    for f in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(e1, f), getattr(e2, f))
    assert e1.classes == e2.classes
    # the order in which episodes are drawn does not matter; sample(gen) with the episode's generator agrees
    a.episode(0, 3)
    assert torch.equal(a.episode(0, 7).query_x, e1.query_x)
    assert torch.equal(a.sample(episode_generator(0, 7)).support_x, e1.support_x)
    # different indices and seeds give different episodes
    others = [a.episode(0, i) for i in range(6)] + [a.episode(1, 7)]
    sigs = {(o.classes, tuple(ids_of(o.support_x).tolist())) for o in others + [e1]}
    assert len(sigs) == len(others) + 1
    # pinned: the same (seed, index) gives these episodes on any machine (torch's CPU generator)
    assert a.episode(0, 0).classes == (5, 6, 1, 2, 0)
    assert a.episode(1, 0).classes == (3, 1, 4, 8, 5)
    assert a.episode(0, 1).classes == (2, 0, 1, 5, 9)


def test_fixed_episode_lists():
    s = EpisodeSampler(synthetic_split(), 3, 1, 2)
    eps = s.episodes(4, seed=5)
    assert [e.classes for e in eps] == [s.episode(5, i).classes for i in range(4)]


def test_sampler_rejects_what_the_split_cannot_provide():
    sp = synthetic_split(C=10, n=8)
    with pytest.raises(ValueError, match=r"ways=11 exceeds the 10 classes of the 'train' split") as e:
        EpisodeSampler(sp, 11, 1, 1)
    one_line_error(e)
    with pytest.raises(ValueError, match=r"fewer than shots \+ queries = 9 images \(e\.g\. 'class0': 8\)") as e:
        EpisodeSampler(sp, 5, 4, 5)
    one_line_error(e)
    for kw in (dict(ways=0), dict(shots=-1), dict(queries=True), dict(ways=2.0)):
        args = {**dict(ways=2, shots=1, queries=1), **kw}
        name, value = next(iter(kw.items()))
        with pytest.raises(ValueError, match=rf"{name} must be an integer >= 1, got {value!r}"):
            EpisodeSampler(sp, **args)


def test_mean_ci_against_a_hand_value():
    m, ci = mean_ci([1.0, 0.0, 1.0, 1.0])
    # mean 3/4; population std sqrt(3/16) = 0.4330127018922193; 1.96 * 0.4330127018922193 / sqrt(4)
    assert m == 0.75
    assert abs(ci - 0.424352447854375) < 1e-12
    assert mean_ci([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError, match="at least one value"):
        mean_ci([])


class FakeTaskDataset:
    """learn2learn's TaskDataset interface: sample() -> (x, y), labels arbitrary and interleaved."""

    def __init__(self, y=(7, 2, 9, 2, 7, 9, 9, 7, 2)):
        self.y = torch.tensor(y)
        self.calls = 0

    def sample(self):
        self.calls += 1
        x = torch.arange(len(self.y), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
        return x, self.y


def test_task_dataset_source_splits_and_relabels_a_sampled_task():
    src = TaskDatasetSource(FakeTaskDataset(), ways=3, shots=2, queries=1)
    ep = src.sample()
    assert ep.classes == (7, 2, 9)  # relabelled in order of first appearance
    assert ep.support_y.tolist() == [0, 0, 1, 1, 2, 2] and ep.query_y.tolist() == [0, 1, 2]
    # positions of class 7: 0, 4, 7; of 2: 1, 3, 8; of 9: 2, 5, 6 -> first two support, next one query
    assert ep.support_x[:, 0, 0, 0].tolist() == [0, 4, 1, 3, 2, 5]
    assert ep.query_x[:, 0, 0, 0].tolist() == [7, 8, 6]
    assert ep.support_x.dtype == torch.float32 and ep.query_x.shape == (3, 1, 2, 2)
    assert src.episode(0, 0).classes == (7, 2, 9) and src.source.calls == 2


def test_task_dataset_source_errors():
    with pytest.raises(ValueError, match="gave 3 classes, expected ways=2"):
        TaskDatasetSource(FakeTaskDataset(), ways=2, shots=2, queries=1).sample()
    with pytest.raises(ValueError, match="class 7 has 3 examples, expected shots \\+ queries = 4"):
        TaskDatasetSource(FakeTaskDataset(), ways=3, shots=2, queries=2).sample()
    with pytest.raises(TypeError, match="sample"):
        TaskDatasetSource(object(), ways=3, shots=2, queries=1)
    for kw in (dict(ways=0), dict(shots=0), dict(queries=-1)):
        args = {**dict(ways=3, shots=2, queries=1), **kw}
        name, value = next(iter(kw.items()))
        with pytest.raises(ValueError, match=rf"{name} must be an integer >= 1, got {value!r}"):
            TaskDatasetSource(FakeTaskDataset(), **args)


# ---------------------------------------------------------------------- omniglot-small (real data)

@pytest.fixture(scope="module")
def omniglot_small(data_dir):
    return load_omniglot_small(data_dir)


def _digest(x: torch.Tensor) -> str:
    return hashlib.sha1(x.contiguous().numpy().tobytes()).hexdigest()


def test_omniglot_small_splits_are_class_disjoint_and_deduplicated(omniglot_small):
    sp = omniglot_small
    base = {k: sorted({n.split("@rot")[0] for n in s.class_names}) for k, s in sp.items()}
    assert [len(base[k]) for k in SPLITS] == [163, 22, 57]
    assert len(set().union(*base.values())) == 242  # Greek and Latin, in both zips, are kept once
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not set(base[a]) & set(base[b])
                assert not {n.split("/")[0] for n in base[a]} & {n.split("/")[0] for n in base[b]}
    assert {n.split("/")[0] for n in base["train"]} == set(SMALL_SPLIT["train"])
    # no two characters, in any split, hold the same images (the duplicate copies really are gone)
    digests = [_digest(s.images[s.class_indices(c)]) for k, s in sp.items()
               for c, n in enumerate(s.class_names) if "@rot" not in n or n.endswith("@rot0")]
    assert len(digests) == len(set(digests)) == 242
    for s in sp.values():
        assert s.images.dtype == torch.uint8 and s.image_shape == (1, 28, 28) and set(s.counts()) == {20}
    # 20-way 5-shot episodes with 15 queries exist in every split
    for s in sp.values():
        EpisodeSampler(s, 20, 5, 15)


def test_omniglot_small_rotations_only_in_train(omniglot_small):
    tr, va, te = (omniglot_small[k] for k in SPLITS)
    assert not any("@rot" in n for n in va.class_names + te.class_names)
    assert tr.num_classes == 4 * 163
    assert [n.rsplit("@rot", 1)[1] for n in tr.class_names[:8]] == ["0", "90", "180", "270"] * 2
    for c in (0, 4 * 100):
        x0 = tr.images[tr.class_indices(c)]
        for k in range(1, 4):
            assert torch.equal(tr.images[tr.class_indices(c + k)], torch.rot90(x0, k, dims=(2, 3)))
    # every split is normalised with the training split's statistics
    x = tr.images[tr.class_indices(0)]
    assert not torch.equal(x, torch.zeros_like(x))
    assert torch.equal(va.mean, tr.mean) and torch.equal(te.std, tr.std)


# ------------------------------------------------------------------------------ tiny-file writers

def rand_images(n, seed, h=84, w=84, c=3):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def png(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a).save(b, "PNG")
    return b.getvalue()


def source(classes: dict[str, list[str]], n=3, h=84, w=84):
    """{split: {class name: uint8 (n, h, w, 3)}} of random images."""
    out, seed = {}, 0
    for s, names in classes.items():
        out[s] = {}
        for name in names:
            out[s][name] = rand_images(n, seed, h, w)
            seed += 1
    return out


def interleaved(src_split: dict, order: list[str]):
    """(images (N, H, W, 3), class of each image) with the classes' images interleaved."""
    items = [(name, i) for i in range(max(len(v) for v in src_split.values())) for name in order
             if i < len(src_split[name])]
    return np.stack([src_split[n][i] for n, i in items]), [n for n, _ in items]


def check_split(split: FewShotSplit, src_split: dict, names: list[str], hw=(84, 84)):
    """split holds exactly src_split's classes, in the order `names`, each class's images in order."""
    assert split.class_names == names
    assert split.images.dtype == torch.uint8 and split.image_shape == (3, *hw)
    for c, n in enumerate(names):
        assert torch.equal(split.images[split.class_indices(c)], torch.from_numpy(src_split[n].transpose(0, 3, 1, 2)))


def check_stats(splits, src_train: dict):
    x = np.concatenate(list(src_train.values())).astype(np.float64) / 255.0
    mean, std = x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))
    for s in splits.values():
        assert torch.allclose(s.mean.flatten().double(), torch.from_numpy(mean), atol=1e-6)
        assert torch.allclose(s.std.flatten().double(), torch.from_numpy(std), atol=1e-6)


MINI = {"train": ["n03", "n01", "n02"], "val": ["n12", "n11"], "test": ["n21", "n22"]}


def write_mini_pkl(root, src, *, val_name="validation", bytes_keys=False, protocol=4):
    root.mkdir(parents=True, exist_ok=True)
    k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    for s in SPLITS:
        images, cls = interleaved(src[s], list(src[s]))
        d = {k("image_data"): images,
             k("class_dict"): {k(n): [i for i, c in enumerate(cls) if c == n] for n in src[s]}}
        name = {"val": val_name}.get(s, s)
        (root / f"mini-imagenet-cache-{name}.pkl").write_bytes(pickle.dumps(d, protocol=protocol))
    return root


def write_mini_hdf5(root, src):
    import h5py
    root.mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        with h5py.File(root / f"{s}_data.hdf5", "w") as f:
            g = f.create_group("datasets")
            for n, a in src[s].items():
                g.create_dataset(n, data=a)
        (root / f"{s}_labels.json").write_text(json.dumps(list(src[s])))  # unsorted on purpose
    return root


def test_miniimagenet_pkl_and_hdf5_layouts_give_the_same_splits(tmp_path):
    src = source(MINI)
    write_mini_pkl(tmp_path / "a" / "miniimagenet", src)
    write_mini_pkl(tmp_path / "b", src, val_name="val", bytes_keys=True, protocol=2)
    write_mini_hdf5(tmp_path / "c" / "mini-imagenet", src)
    layouts = {"pkl in miniimagenet/": tmp_path / "a", "pkl, -val.pkl, bytes keys, protocol 2": tmp_path / "b",
               "hdf5 in mini-imagenet/": tmp_path / "c"}
    for what, data_dir in layouts.items():
        splits = load_miniimagenet(data_dir)
        assert list(splits) == list(SPLITS), what
        for s in SPLITS:
            check_split(splits[s], src[s], sorted(src[s]))
            assert torch.equal(splits[s].labels.unique(), torch.arange(len(src[s])))
        check_stats(splits, src["train"])
    # the same folder holding both layouts: layout= chooses
    both = write_mini_hdf5(tmp_path / "a" / "miniimagenet", source(MINI, n=2))
    assert load_miniimagenet(both, layout="hdf5")["train"].counts() == [2, 2, 2]
    assert load_miniimagenet(both, layout="pkl")["train"].counts() == [3, 3, 3]


def write_jpeg_csv(root, *, csv_beside=True, resize_one=True):
    """Ravi & Larochelle's layout: constant-colour JPEGs (exact through JPEG) under images/, one of
    them 100×120 so that the reader must resize it."""
    colours, rows = {}, {}
    (root / "images").mkdir(parents=True, exist_ok=True)
    k = 0
    for s, names in MINI.items():
        rows[s] = []
        for n in names:
            for i in range(2):
                fname = f"{n}{i:08d}.jpg"
                colour = (10 * k % 256, 255 - 7 * k, 3 * k)
                shape = (100, 120, 3) if (resize_one and k == 0) else (84, 84, 3)
                Image.fromarray(np.full(shape, colour, np.uint8)).save(root / "images" / fname, quality=95)
                colours[fname] = colour
                rows[s].append(f"{fname},{n}")
                k += 1
    csv_dir = root if csv_beside else root.parent / "fewshot_splits" / "miniimagenet"
    csv_dir.mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        (csv_dir / f"{s}.csv").write_text("filename,label\n" + "\n".join(rows[s]) + "\n")
    return colours, rows


def test_miniimagenet_csv_layout(tmp_path):
    colours, rows = write_jpeg_csv(tmp_path / "miniimagenet")
    splits = load_miniimagenet(tmp_path)
    for s in SPLITS:
        sp = splits[s]
        assert sp.class_names == sorted(MINI[s]) and sp.image_shape == (3, 84, 84)
        for c, n in enumerate(sp.class_names):
            files = [r.split(",")[0] for r in rows[s] if r.endswith("," + n)]
            got = sp.images[sp.class_indices(c)].to(torch.int64)
            want = torch.tensor([colours[f] for f in files]).view(-1, 3, 1, 1).expand_as(got)
            assert (got - want).abs().max() <= 2  # JPEG of a constant colour, then resizing


def test_miniimagenet_csv_from_the_split_folder_and_missing_images(tmp_path, isolated):
    write_jpeg_csv(tmp_path / "miniimagenet", csv_beside=False, resize_one=False)
    assert load_miniimagenet(tmp_path)["val"].num_classes == 2  # CSVs of fewshot_splits/miniimagenet/
    (tmp_path / "miniimagenet" / "images" / "n1100000001.jpg").unlink()
    with pytest.raises(FewShotDataError, match=r"val\.csv: 1 of the 4 images it lists are not in .*n1100000001\.jpg"
                       ) as e:
        load_miniimagenet(tmp_path)
    one_line_error(e)
    for f in (tmp_path / "fewshot_splits" / "miniimagenet").iterdir():
        f.unlink()
    with pytest.raises(FewShotDataError, match=r"found .*images but not train\.csv, val\.csv, test\.csv"):
        load_miniimagenet(tmp_path)


TIERED = {"train": ["n0010", "n0003", "n0007"], "val": ["n0100", "n0099"], "test": ["n0200", "n0300"]}


def write_tiered(root, src, *, which=("pkl", "npz", "hdf5"), bytes_keys=False):
    """Ren et al.'s pickles (protocol 2, PNGs as uint8 arrays and as bytes), the OpenCV npz (BGR) and
    torchmeta's hdf5 (one variable-length PNG per entry), for the same images."""
    root.mkdir(parents=True, exist_ok=True)
    k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    for s in SPLITS:
        names = list(src[s])
        images, cls = interleaved(src[s], names[::-1])
        general = ["animal", "device"]
        labels = {k("label_specific"): np.array([names.index(c) for c in cls], dtype=np.int64),
                  k("label_specific_str"): names,
                  k("label_general"): np.array([names.index(c) % 2 for c in cls], dtype=np.int64),
                  k("label_general_str"): general}
        (root / f"{s}_labels.pkl").write_bytes(pickle.dumps(labels, protocol=2))
        if "pkl" in which:
            encoded = [np.frombuffer(png(a), dtype=np.uint8) if i % 2 else png(a) for i, a in enumerate(images)]
            (root / f"{s}_images_png.pkl").write_bytes(pickle.dumps(encoded, protocol=2))
        if "npz" in which:
            save = np.savez_compressed if s == "train" else np.savez
            save(root / f"{s}_images.npz", images=np.ascontiguousarray(images[..., ::-1]))
        if "hdf5" in which:
            import h5py
            with h5py.File(root / f"{s}_data.hdf5", "w") as f:
                g = f.create_group("datasets")
                for n in names:
                    ds = g.create_dataset(n, (len(src[s][n]),), dtype=h5py.vlen_dtype(np.uint8))
                    for j, a in enumerate(src[s][n]):
                        ds[j] = np.frombuffer(png(a), dtype=np.uint8)
                    ds.attrs["label_general"] = general[names.index(n) % 2]
            (root / f"{s}_labels.json").write_text(json.dumps(names))
    return root


def test_tieredimagenet_layouts_give_the_same_splits(tmp_path, monkeypatch):
    monkeypatch.setattr(tiered_module, "_CHUNK", 2)  # stream the npz in several chunks, the last one short
    src = source(TIERED)
    write_tiered(tmp_path / "tieredimagenet", src)
    for layout in ("pkl", "npz", "hdf5"):
        splits = load_tieredimagenet(tmp_path, layout=layout)
        for s in SPLITS:
            check_split(splits[s], src[s], TIERED[s])  # classes in label_specific order; RGB
        check_stats(splits, src["train"])
    bytes_root = write_tiered(tmp_path / "b", src, which=("pkl",), bytes_keys=True)
    check_split(load_tieredimagenet(bytes_root)["test"], src["test"], TIERED["test"])


def write_cifar100(root, src_train, src_test, names, *, protocol=2):
    """cifar-100-python/{train,test,meta} with bytes keys (as read from CIFAR's Python 2 pickles)."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    for fname, src in (("train", src_train), ("test", src_test)):
        images, cls = interleaved(src, list(src))
        batch = {b"filenames": [f"{i}.png".encode() for i in range(len(cls))], b"batch_label": fname.encode(),
                 b"fine_labels": [names.index(c) for c in cls], b"coarse_labels": [0] * len(cls),
                 b"data": images.transpose(0, 3, 1, 2).reshape(len(cls), 3072)}
        (d / fname).write_bytes(pickle.dumps(batch, protocol=protocol))
    meta = {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"all"]}
    (d / "meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return root


CIFAR = {"train": ["cup", "apple", "fox"], "val": ["bee", "dolphin"], "test": ["girl", "elephant"]}
CIFAR_NAMES = ["apple", "bee", "cup", "dolphin", "elephant", "fox", "girl", "house"]


def cifar_source():
    tr = {c: rand_images(2, 50 + i, 32, 32) for i, c in enumerate(CIFAR_NAMES)}
    te = {c: rand_images(1, 150 + i, 32, 32) for i, c in enumerate(CIFAR_NAMES)}
    return tr, te


def write_cifar_split(folder, classes=CIFAR):
    folder.mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        (folder / f"{s}.json").write_text(json.dumps([["super", c] for c in classes[s]]))
    return folder


def write_cifar_png(root, tr, te, classes=CIFAR):
    for c in CIFAR_NAMES:
        (root / "data" / c).mkdir(parents=True, exist_ok=True)
        for i, a in enumerate(np.concatenate([tr[c], te[c]])):
            Image.fromarray(a).save(root / "data" / c / f"{c}_{i:03d}.png")
    (root / "splits" / "bertinetto").mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        (root / "splits" / "bertinetto" / f"{s}.txt").write_text("\n".join(classes[s]) + "\n")
    return root


def test_cifarfs_pickle_and_png_layouts_give_the_same_splits(tmp_path):
    tr, te = cifar_source()
    want = {s: {c: np.concatenate([tr[c], te[c]]) for c in CIFAR[s]} for s in SPLITS}  # train then test
    write_cifar100(tmp_path / "cifar100", tr, te, CIFAR_NAMES)
    split_dir = write_cifar_split(tmp_path / "split")
    write_cifar_png(tmp_path / "png" / "cifar-fs", tr, te)
    for splits in (load_cifarfs(tmp_path, split_dir=split_dir), load_cifarfs(tmp_path / "png")):
        for s in SPLITS:
            check_split(splits[s], want[s], CIFAR[s], hw=(32, 32))
            assert splits[s].counts() == [3] * len(CIFAR[s])
        check_stats(splits, want["train"])


def test_cifarfs_with_the_real_split_files(tmp_path, data_dir):
    spec = {s: json.loads((Path(data_dir) / "fewshot_splits" / "cifar_fs" / f"{s}.json").read_text())
            for s in SPLITS}
    names = sorted(c for s in SPLITS for _, c in spec[s])
    assert len(names) == 100
    tr = {c: rand_images(1, i, 32, 32) for i, c in enumerate(names)}
    te = {c: rand_images(1, 1000 + i, 32, 32) for i, c in enumerate(names)}
    write_cifar100(tmp_path, tr, te, names)
    splits = load_cifarfs(tmp_path)  # the split comes from fewshot_splits/cifar_fs of $L2L_ZOO_DATA
    assert [splits[s].num_classes for s in SPLITS] == [64, 16, 20]
    assert splits["test"].class_names == [c for _, c in spec["test"]]
    assert all(n == 2 for s in SPLITS for n in splits[s].counts())


ALPHABETS = {"background": {"Alpha": ["character01", "character02"], "Gamma": ["character01"]},
             "evaluation": {"Beta": ["character01"], "Delta": ["character01", "character02"]}}
OMNI_SPLIT = {"train": {"background": {"Alpha": ["character01", "character02"]},
                        "evaluation": {"Beta": ["character01"]}},
              "val": {"background": {"Gamma": ["character01"]}},
              "test": {"evaluation": {"Delta": ["character01", "character02"]}}}


def omniglot_images(alphabets, drawers=2, start=0):
    """{(part, alphabet, character): [105×105 grey PNG arrays]}: image number i is a constant image of
    grey 255 − i, so that (strokes bright on dark) it reads back as the constant i."""
    out, i = {}, start
    for part, als in alphabets.items():
        for a, chars in als.items():
            for c in chars:
                out[(part, a, c)] = [np.full((105, 105), 255 - (i + j), np.uint8) for j in range(drawers)]
                i += drawers
    return out


def write_omniglot(root, images, *, zipped: bool, roots=None):
    roots = roots or {"background": "images_background", "evaluation": "images_evaluation"}
    root.mkdir(parents=True, exist_ok=True)
    for part, rname in roots.items():
        files = {f"{rname}/{a}/{c}/{j:02d}.png": png(im[..., None]) for (p, a, c), ims in images.items() if p == part
                 for j, im in enumerate(ims)}
        if zipped:
            with zipfile.ZipFile(root / f"{rname}.zip", "w") as z:
                for n, data in sorted(files.items()):
                    z.writestr(n, data)
        else:
            for n, data in files.items():
                (root / n).parent.mkdir(parents=True, exist_ok=True)
                (root / n).write_bytes(data)


def test_omniglot_folders_and_zips_with_a_split_file(tmp_path):
    images = omniglot_images(ALPHABETS)
    split_dir = tmp_path / "folders" / "fewshot_splits" / "omniglot"  # found there by default
    split_dir.mkdir(parents=True)
    for s in SPLITS:
        (split_dir / f"{s}.json").write_text(json.dumps(OMNI_SPLIT[s]))
    write_omniglot(tmp_path / "folders" / "omniglot", images, zipped=False)
    write_omniglot(tmp_path / "zips", images, zipped=True)
    a = load_omniglot(tmp_path / "folders")
    b = load_omniglot(tmp_path / "zips", split_dir=split_dir)
    for s in SPLITS:
        assert a[s].class_names == b[s].class_names and torch.equal(a[s].images, b[s].images)
        assert torch.equal(a[s].labels, b[s].labels)
    assert a["val"].class_names == ["Gamma/character01"]
    assert a["test"].class_names == ["Delta/character01", "Delta/character02"]
    assert a["train"].class_names[:4] == [f"Alpha/character01@rot{r}" for r in (0, 90, 180, 270)]
    assert a["train"].num_classes == 12 and a["train"].image_shape == (1, 28, 28)
    # image ids: 28×28, inverted (strokes bright), in the split file's character order
    ids = {s: [int(a[s].images[a[s].class_indices(c)][:, 0].float().mean(dim=(1, 2))[0])
               for c in range(a[s].num_classes)] for s in SPLITS}
    assert ids["train"] == [0] * 4 + [2] * 4 + [6] * 4 and ids["val"] == [4] and ids["test"] == [8, 10]
    assert torch.equal(a["test"].images[a["test"].class_indices(1)],
                       torch.tensor([10, 11], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 28, 28))
    assert load_omniglot(tmp_path / "zips", split_dir=split_dir, rotations=False)["train"].num_classes == 3


def test_omniglot_split_dir_that_is_missing_is_named(tmp_path, isolated):
    write_omniglot(tmp_path / "omniglot", omniglot_images(ALPHABETS), zipped=True)
    missing = tmp_path / "no_such_split"
    with pytest.raises(FewShotDataError, match="no_such_split") as e:
        load_omniglot(tmp_path, split_dir=missing)
    one_line_error(e)
    for load, what in ((load_omniglot, "Omniglot"), (load_omniglot_small, "Omniglot small background sets")):
        with pytest.raises(FewShotDataError, match=rf"{what} not found: data_dir '.*nowhere' does not exist"):
            load(tmp_path / "nowhere")


def write_omniglot_small(root, drawers=2):
    """images_background_small{1,2}.zip with SMALL_SPLIT's alphabets; Greek and Latin in both zips,
    identical (as in the real files)."""
    chars = {a: [f"character0{i}" for i in range(1, 3)] for s in SMALL_SPLIT.values() for a in s}
    zip1 = ("Balinese", "Greek", "Latin", "Early_Aramaic", "Korean")
    zip2 = ("Greek", "Latin", "Japanese_(katakana)", "Sanskrit", "Tagalog")
    images = omniglot_images({"all": chars}, drawers)
    root.mkdir(parents=True, exist_ok=True)
    for zname, als in (("images_background_small1", zip1), ("images_background_small2", zip2)):
        with zipfile.ZipFile(root / f"{zname}.zip", "w") as z:
            for (_, a, c), ims in images.items():
                if a in als:
                    for j, im in enumerate(ims):
                        z.writestr(f"{zname}/{a}/{c}/{j:02d}.png", png(im[..., None]))
    return images


def test_omniglot_small_on_tiny_zips_keeps_duplicated_alphabets_once(tmp_path):
    write_omniglot_small(tmp_path / "omniglot")
    sp = load_omniglot_small(tmp_path, rotations=False)
    assert [sp[s].num_classes for s in SPLITS] == [10, 2, 4]
    assert sorted(sp["train"].class_names) == sp["train"].class_names
    assert [n for n in sp["train"].class_names if n.startswith("Greek")] == ["Greek/character01", "Greek/character02"]
    with pytest.raises(ValueError, match="split must assign distinct alphabets"):
        load_omniglot_small(tmp_path, split={"train": ("Greek",), "val": ("Greek",), "test": ("Korean",)})


# ------------------------------------------------------------------------------- the registry

def _omniglot_small(root):
    write_omniglot_small(root / "omniglot")
    return root, {}


def _omniglot_full(root):
    write_omniglot(root / "omniglot", omniglot_images(ALPHABETS, drawers=2), zipped=False)
    d = root / "fewshot_splits" / "omniglot"
    d.mkdir(parents=True)
    for s in SPLITS:
        (d / f"{s}.json").write_text(json.dumps(OMNI_SPLIT[s]))
    return root, {}


def _cifar(root):
    tr, te = cifar_source()
    write_cifar100(root, tr, te, CIFAR_NAMES)
    return root, {"split_dir": write_cifar_split(root / "split")}


# one tiny-file writer per registered dataset: (folder) -> (data_dir, reader options)
WRITERS = {
    "omniglot-small": _omniglot_small,
    "omniglot": _omniglot_full,
    "miniimagenet": lambda root: (write_mini_pkl(root / "miniimagenet", source(MINI)).parent, {}),
    "tieredimagenet": lambda root: (write_tiered(root, source(TIERED, n=2), which=("npz",)), {}),
    "cifarfs": _cifar,
}


def test_every_registered_dataset_has_a_tiny_format_test():
    assert set(WRITERS) == set(DATASETS)


@pytest.mark.parametrize("name", DATASETS)
def test_load_fewshot_dispatches_every_registered_name(name, tmp_path, isolated):
    data_dir, options = WRITERS[name](tmp_path)
    splits = load_fewshot(name, data_dir, **options)
    assert list(splits) == list(SPLITS)
    names = [set(n.split("@rot")[0] for n in splits[s].class_names) for s in SPLITS]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    for s in SPLITS:
        sp = splits[s]
        assert isinstance(sp, FewShotSplit) and sp.images.dtype == torch.uint8 and sp.name == s
        assert torch.equal(sp.labels.unique(), torch.arange(sp.num_classes))
        assert torch.equal(sp.mean, splits["train"].mean)


def test_load_fewshot_unknown_name():
    with pytest.raises(KeyError, match=r"unknown few-shot dataset 'imagenet'; choose from \['omniglot-small'") as e:
        load_fewshot("imagenet")
    one_line_error(e)


def test_channel_stats_is_exact():
    x = torch.from_numpy(rand_images(7, 3, 5, 6, 3).transpose(0, 3, 1, 2).copy())
    mean, std = channel_stats(x, chunk=3)
    f = x.double() / 255
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), f.mean(dim=(0, 2, 3)), atol=1e-15, rtol=0)
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), f.std(dim=(0, 2, 3), unbiased=False), atol=1e-15,
                          rtol=0)


# ------------------------------------------------------------------- missing and malformed files

def test_nothing_found_names_the_layouts_and_the_folders(tmp_path, isolated):
    for load, layouts in ((load_miniimagenet, ["mini-imagenet-cache-", "_data.hdf5", "train,val,test}.csv"]),
                          (load_tieredimagenet, ["_images_png.pkl", "_images.npz", "_data.hdf5"]),
                          (load_cifarfs, ["cifar-100-python/", "splits/bertinetto/"])):
        with pytest.raises(FewShotDataError, match="not found: need") as e:
            load(tmp_path)
        msg = one_line_error(e)
        assert str(tmp_path) in msg and "data_dir" in msg and all(l in msg for l in layouts), msg
    with pytest.raises(FewShotDataError, match="no data folder to look in"):
        load_miniimagenet()
    with pytest.raises(FewShotDataError, match=r"miniImageNet not found: data_dir '.*nowhere' does not exist"):
        load_miniimagenet(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"layout must be 'auto' or one of \['pkl', 'hdf5', 'csv'\], got 'zip'"):
        load_miniimagenet(tmp_path, layout="zip")


def test_an_incomplete_layout_names_the_missing_file(tmp_path, isolated):
    write_mini_pkl(tmp_path, source(MINI, n=1))
    (tmp_path / "mini-imagenet-cache-validation.pkl").unlink()
    with pytest.raises(FewShotDataError, match=r"incomplete: .* has part of the pkl layout but not "
                       r"mini-imagenet-cache-validation\.pkl or mini-imagenet-cache-val\.pkl") as e:
        load_miniimagenet(tmp_path)
    one_line_error(e)


def test_a_split_file_given_twice_is_an_error(tmp_path):
    root = write_mini_pkl(tmp_path, source(MINI, n=1))
    (root / "mini-imagenet-cache-test.pkl").write_bytes((root / "mini-imagenet-cache-validation.pkl").read_bytes())
    with pytest.raises(FewShotDataError, match="class 'n11' is in both the val and the test split"):
        load_miniimagenet(root)


def _write_default(name, root):
    if name == "miniimagenet":
        return write_mini_pkl(root, source(MINI, n=1))
    if name.startswith("tiered"):
        return write_tiered(root, source(TIERED, n=1))
    tr, te = cifar_source()
    write_cifar_split(root / "fewshot_splits" / "cifar_fs")
    return write_cifar100(root, tr, te, CIFAR_NAMES)


# (dataset, layout, file replaced): one file of every kind the readers open
FILES = [("miniimagenet", "pkl", "mini-imagenet-cache-train.pkl"),
         ("tieredimagenet", "pkl", "train_labels.pkl"),
         ("tieredimagenet", "pkl", "train_images_png.pkl"),
         ("tieredimagenet", "npz", "train_images.npz"),
         ("tieredimagenet", "hdf5", "train_data.hdf5"),
         ("tieredimagenet", "hdf5", "train_labels.json"),
         ("cifarfs", "pickle", "cifar-100-python/meta")]
LOADERS = {"miniimagenet": load_miniimagenet, "tieredimagenet": load_tieredimagenet, "cifarfs": load_cifarfs}


@pytest.mark.parametrize("name,layout,fname", FILES)
def test_an_html_page_saved_as_a_data_file_is_recognised(name, layout, fname, tmp_path, isolated):
    root = _write_default(name, tmp_path)
    (root / fname).write_bytes(b"\n  <!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title>")
    with pytest.raises(FewShotDataError, match="looks like an HTML page") as e:
        LOADERS[name](root, layout=layout)
    assert fname.split("/")[-1] in one_line_error(e)


@pytest.mark.parametrize("name,layout,fname", [f for f in FILES if f[2].endswith(("pkl", "meta"))])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(name, layout, fname, tmp_path, isolated):
    root = _write_default(name, tmp_path)
    marker = tmp_path / "marker"

    class Evil:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    data = pickle.dumps({"image_data": np.zeros(1), "label_specific": Evil(), "fine_label_names": [Evil()]})
    (root / fname).write_bytes(data)
    with pytest.raises(FewShotDataError, match=r"refused to unpickle builtins\.exec") as e:
        LOADERS[name](root, layout=layout)
    one_line_error(e)
    assert not marker.exists()
    pickle.loads(data)  # the file is hostile: an ordinary unpickler runs its code
    assert marker.exists()


def test_truncated_and_wrongly_keyed_files(tmp_path, isolated):
    root = write_mini_pkl(tmp_path, source(MINI, n=1))
    p = root / "mini-imagenet-cache-train.pkl"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(FewShotDataError, match=r"mini-imagenet-cache-train\.pkl: not a readable pickle") as e:
        load_miniimagenet(root)
    one_line_error(e)
    p.write_bytes(pickle.dumps({"images": np.zeros((1, 84, 84, 3), np.uint8), "class_dict": {}}))
    with pytest.raises(FewShotDataError, match=r"no key 'image_data'; found keys \['class_dict', 'images'\]"):
        load_miniimagenet(root)
    p.write_bytes(pickle.dumps({"image_data": np.zeros((1, 84, 84), np.float32), "class_dict": {"n01": [0]}}))
    with pytest.raises(FewShotDataError, match=r"image_data must be uint8 of shape \(N, H, W, 3\), got float32"):
        load_miniimagenet(root)
    p.write_bytes(pickle.dumps({"image_data": np.zeros((1, 84, 84, 3), np.uint8), "class_dict": {"n01": [0, 1]}}))
    with pytest.raises(FewShotDataError, match=r"class_dict\['n01'\] must list indices in 0\.\.0"):
        load_miniimagenet(root)


def py2_pickle(obj) -> bytes:
    """``obj`` as Python 2 with numpy 1.x pickles it (protocol 0): ``str`` and ``bytes`` become Python 2
    byte strings (so they read back as str with encoding='latin1', as bytes with encoding='bytes'),
    arrays go through numpy.core.multiarray._reconstruct."""
    def string(b: bytes) -> bytes:
        return b"S" + repr(b)[1:].encode() + b"\n"

    def w(o) -> bytes:
        if isinstance(o, dict):
            return b"(d" + b"".join(w(k) + w(v) + b"s" for k, v in o.items())
        if isinstance(o, list):
            return b"(l" + b"".join(w(v) + b"a" for v in o)
        if isinstance(o, (str, bytes)):
            return string(o.encode() if isinstance(o, str) else o)
        if isinstance(o, int):
            return b"I%d\n" % o
        code, endian = {np.uint8: (b"u1", b"|"), np.int64: (b"i8", b"<")}[o.dtype.type]
        return (b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(I0\nt" + string(b"b") + b"tR(I1\n("
                + b"".join(b"I%d\n" % d for d in o.shape) + b"tcnumpy\ndtype\n(" + string(code) + b"I0\nI1\ntR(I3\n"
                + string(endian) + b"NNNI-1\nI-1\nI0\ntbI00\n" + string(o.tobytes()) + b"tb")
    return w(obj) + b"."


def test_python2_pickles_are_read(tmp_path):
    """The releases of miniImageNet, tieredImageNet and CIFAR-100 were pickled by Python 2."""
    src = source(MINI, n=1)
    for s in SPLITS:
        images, cls = interleaved(src[s], list(src[s]))
        d = {"image_data": images, "class_dict": {n: [i for i, c in enumerate(cls) if c == n] for n in src[s]}}
        (tmp_path / "mini" / f"mini-imagenet-cache-{s.replace('val', 'validation')}.pkl").parent.mkdir(exist_ok=True)
        (tmp_path / "mini" / f"mini-imagenet-cache-{s.replace('val', 'validation')}.pkl").write_bytes(py2_pickle(d))
    for s, sp in load_miniimagenet(tmp_path / "mini").items():
        check_split(sp, src[s], sorted(src[s]))
    src = source(TIERED, n=1)
    (tmp_path / "tiered").mkdir()
    for s in SPLITS:
        names = list(src[s])
        labels = {"label_specific": np.arange(len(names), dtype=np.int64), "label_specific_str": names,
                  "label_general": np.zeros(len(names), dtype=np.int64), "label_general_str": ["animal"]}
        (tmp_path / "tiered" / f"{s}_labels.pkl").write_bytes(py2_pickle(labels))
        encoded = [np.frombuffer(png(src[s][n][0]), dtype=np.uint8).copy() for n in names]
        (tmp_path / "tiered" / f"{s}_images_png.pkl").write_bytes(py2_pickle(encoded))
    for s, sp in load_tieredimagenet(tmp_path / "tiered").items():
        check_split(sp, src[s], TIERED[s])
    tr, te = cifar_source()
    d = tmp_path / "cifar" / "cifar-100-python"
    d.mkdir(parents=True)
    for fname, part in (("train", tr), ("test", te)):
        images, cls = interleaved(part, CIFAR_NAMES)
        (d / fname).write_bytes(py2_pickle({"data": images.transpose(0, 3, 1, 2).reshape(len(cls), 3072).copy(),
                                            "fine_labels": [CIFAR_NAMES.index(c) for c in cls]}))
    (d / "meta").write_bytes(py2_pickle({"fine_label_names": CIFAR_NAMES}))
    splits = load_cifarfs(tmp_path / "cifar", split_dir=write_cifar_split(tmp_path / "split"))
    check_split(splits["val"], {c: np.concatenate([tr[c], te[c]]) for c in CIFAR["val"]}, CIFAR["val"], hw=(32, 32))


def test_tiered_label_and_image_count_mismatches(tmp_path, isolated):
    root = write_tiered(tmp_path, source(TIERED, n=1), which=("npz",))
    np.savez(root / "val_images.npz", images=np.zeros((5, 84, 84, 3), np.uint8))
    with pytest.raises(FewShotDataError, match=r"val_images\.npz: 5 images but val_labels\.pkl has 2 labels"):
        load_tieredimagenet(root)
    np.savez(root / "val_images.npz", pics=np.zeros((2, 84, 84, 3), np.uint8))
    with pytest.raises(FewShotDataError, match=r"val_images\.npz: no array 'images'; found \['pics'\]"):
        load_tieredimagenet(root)
    (root / "val_labels.pkl").write_bytes(pickle.dumps({"label_specific": np.array([0, 5]),
                                                        "label_specific_str": ["a", "b"]}))
    with pytest.raises(FewShotDataError, match=r"label_specific must be integers in 0\.\.1"):
        load_tieredimagenet(root)


def test_hdf5_layouts_without_h5py_name_the_extra(tmp_path, isolated, monkeypatch):
    root = write_mini_hdf5(tmp_path, source(MINI, n=1))
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py now raises ImportError
    with pytest.raises(FewShotDataError, match=r"needs h5py, an optional extra: pip install -e '\.\[fewshot\]'") as e:
        load_miniimagenet(root)
    one_line_error(e)


def test_hdf5_layouts_mixed_up_are_named(tmp_path, isolated):
    src = source(TIERED, n=1)
    write_tiered(tmp_path, src, which=("hdf5",))
    with pytest.raises(FewShotDataError, match="that is tieredImageNet's layout"):
        load_miniimagenet(tmp_path)
