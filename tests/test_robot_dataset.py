import json
import re

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ACTION_DIM, CHUNK_SIZE, STATE_DIM
from tests.data_factory import episode_arrays, make_episode, smooth_frames
from vlaflow.data.hdf5_episodes import ACTION, IMAGES, encode_jpeg, hdf5_episodes, list_episode_files, write_episode
from vlaflow.data.images import decode_frame, draw_augmentation
from vlaflow.data.robot_dataset import RobotEpisodeDataset
from vlaflow.data.samples import RobotSpec
from vlaflow.data.stats import NormStats, compute_stats
from vlaflow.errors import VlaflowError

CHUNK = CHUNK_SIZE
SPEC = RobotSpec(cameras=("top",), image_size=(16, 20), action_dim=ACTION_DIM, state_dim=STATE_DIM, chunk_size=CHUNK)


def episode(path):
    return hdf5_episodes([path])[0]


def dataset_of(paths, **kwargs) -> RobotEpisodeDataset:
    return RobotEpisodeDataset(hdf5_episodes(paths), SPEC, compute_stats(hdf5_episodes(paths)), **kwargs)


def raw_chunk(dataset, sample) -> np.ndarray:
    return dataset.stats.unnormalize_actions(sample.actions[~sample.is_pad])


def test_sim_chunk_starts_at_t(tmp_path):
    path = make_episode(tmp_path / "sim.hdf5", sim=True)
    dataset = dataset_of([path])
    actions, _ = episode_arrays(10)
    sample = dataset[3]
    assert not sample.is_pad.any()
    np.testing.assert_allclose(raw_chunk(dataset, sample), actions[3:8], atol=1e-5)


def test_real_chunk_starts_at_t_minus_one_clamped_at_zero(tmp_path):
    path = make_episode(tmp_path / "real.hdf5", sim=False)
    dataset = dataset_of([path])
    actions, _ = episode_arrays(10)
    np.testing.assert_allclose(raw_chunk(dataset, dataset[3]), actions[2:7], atol=1e-5)
    np.testing.assert_allclose(raw_chunk(dataset, dataset[0]), actions[0:5], atol=1e-5)
    np.testing.assert_allclose(raw_chunk(dataset, dataset[1]), actions[0:5], atol=1e-5)


def test_chunk_padded_past_episode_end(tmp_path):
    path = make_episode(tmp_path / "sim.hdf5", sim=True)
    dataset = dataset_of([path])
    actions, _ = episode_arrays(10)
    sample = dataset[8]
    assert sample.is_pad.tolist() == [False, False, True, True, True]
    assert sample.actions.shape == (CHUNK, ACTION_DIM) and sample.actions.dtype == np.float32
    np.testing.assert_array_equal(sample.actions[2:], 0)
    np.testing.assert_allclose(raw_chunk(dataset, sample), actions[8:10], atol=1e-5)


def test_samples_span_episodes_in_order(tmp_path):
    paths = [make_episode(tmp_path / "a.hdf5", length=4, seed=1), make_episode(tmp_path / "b.hdf5", length=6, seed=2)]
    dataset = dataset_of(paths)
    assert len(dataset) == 10
    assert [dataset[i].source for i in (0, 3, 4, 9)] == [
        f"{paths[0]}:0",
        f"{paths[0]}:3",
        f"{paths[1]}:0",
        f"{paths[1]}:5",
    ]
    assert dataset[3].instruction == "task 1" and dataset[4].instruction == "task 2"
    with pytest.raises(IndexError):
        dataset[10]


def test_reasoning_per_step_then_episode_then_empty(tmp_path):
    steps = [f"step {t}" for t in range(10)]
    per_step = make_episode(tmp_path / "a.hdf5", substep_reasonings=steps, reasoning="whole episode")
    episode_level = make_episode(tmp_path / "b.hdf5", reasoning="whole episode")
    none = make_episode(tmp_path / "c.hdf5")
    dataset = dataset_of([per_step, episode_level, none])
    assert [dataset[i].reasoning for i in (0, 7, 10, 17, 20)] == [
        "step 0",
        "step 7",
        "whole episode",
        "whole episode",
        "",
    ]


def test_state_and_actions_normalised_with_stats(tmp_path):
    path = make_episode(tmp_path / "sim.hdf5")
    dataset = dataset_of([path])
    actions, qpos = episode_arrays(10)
    sample = dataset[4]
    stats = dataset.stats
    np.testing.assert_allclose(sample.state, (qpos[4] - stats.state_mean) / stats.state_std, rtol=1e-5)
    assert sample.state.dtype == np.float32 and sample.state.shape == (STATE_DIM,)
    everything = np.concatenate([dataset[i].actions for i in range(len(dataset))])
    assert everything.min() >= -1 - 1e-6 and everything.max() <= 1 + 1e-6
    np.testing.assert_allclose(stats.unnormalize_actions(stats.normalize_actions(actions)), actions, atol=1e-5)


def test_images_resized_to_spec(tmp_path):
    dataset = dataset_of([make_episode(tmp_path / "sim.hdf5", cameras=("top", "wrist"))])
    images = dataset[0].images
    assert len(images) == 1  # only the configured camera
    assert images[0].size == (20, 16) and images[0].mode == "RGB"


@pytest.mark.parametrize("frame_size", [(480, 640), (96, 128), (61, 83)])
def test_shrinking_a_frame_stays_within_a_few_levels_of_pillows_full_bilinear_filter(frame_size):
    """decode_frame shrinks by a whole factor with a box filter before resampling (fast);
    below a factor of 2 it is Pillow's bilinear filter exactly."""
    rng = np.random.default_rng(0)
    frame = np.clip(smooth_frames(1, *frame_size)[0] + rng.integers(-8, 9, (*frame_size, 3)), 0, 255).astype(np.uint8)
    size = (frame_size[0] // 2, frame_size[1] // 2) if frame_size[0] > 100 else (48, 64)
    ours = np.asarray(decode_frame(frame, size), float)
    full_filter = np.asarray(Image.fromarray(frame).resize(size[::-1], Image.Resampling.BILINEAR), float)
    assert ours.shape == (*size, 3)
    if frame_size[0] >= 2 * size[0]:
        difference = np.abs(ours - full_filter)  # largest at the frames' hard edges, which the filters blur apart
        assert 0 < difference.mean() < 1.5 and np.percentile(difference, 99) <= 6
    else:
        np.testing.assert_array_equal(ours, full_filter)


def test_open_episodes_keep_no_chunk_cache(tmp_path):
    """Random single-frame reads never reuse a cached chunk; a cache per open camera only grows a
    worker's memory with the number of open episodes (tests/benchmarks/robot_loader.py)."""
    dataset = dataset_of([make_episode(tmp_path / "sim.hdf5", cameras=("top", "wrist"))])
    dataset[3]
    (handle,) = dataset._open_episodes.values()
    assert handle.file.id.get_access_plist().get_cache()[2] == 0  # (mdc, slots, bytes, w0)


def test_jpeg_episode_decodes_close_to_raw(tmp_path):
    raw = dataset_of([make_episode(tmp_path / "raw.hdf5")])
    jpeg = dataset_of([make_episode(tmp_path / "jpeg.hdf5", compress=True)])
    assert jpeg.infos[0].compressed and not raw.infos[0].compressed
    for index in (0, 9):
        difference = np.abs(np.asarray(raw[index].images[0], float) - np.asarray(jpeg[index].images[0], float))
        assert difference.mean() < 3


def test_variable_length_jpeg_bytes_decode(tmp_path):
    frames = smooth_frames(3)
    path = tmp_path / "vlen.hdf5"
    with h5py.File(path, "w") as file:
        file[ACTION], file["observations/qpos"] = episode_arrays(3)
        file["language_raw"] = [b"task"]
        camera = file.create_dataset(f"{IMAGES}/top", (3,), dtype=h5py.vlen_dtype(np.uint8))
        for t, frame in enumerate(frames):
            camera[t] = np.frombuffer(encode_jpeg(frame), dtype=np.uint8)
    dataset = RobotEpisodeDataset(hdf5_episodes([path]), SPEC, compute_stats(hdf5_episodes([path])))
    assert dataset.infos[0].compressed and not dataset.infos[0].sim
    assert episode(path).check_decode(SPEC) == {"top": (24, 32)}
    expected = np.asarray(Image.fromarray(frames[2]).resize((20, 16), Image.Resampling.BILINEAR), float)
    assert np.abs(np.asarray(dataset[2].images[0], float) - expected).mean() < 3


def test_augmentation_deterministic_per_seed_index_and_epoch(tmp_path):
    paths = [make_episode(tmp_path / "sim.hdf5")]
    first, second = dataset_of(paths, augment=True, seed=7), dataset_of(paths, augment=True, seed=7)
    plain = dataset_of(paths)

    def pixels(dataset, index):
        return np.asarray(dataset[index].images[0])

    np.testing.assert_array_equal(pixels(first, 3), pixels(second, 3))
    assert pixels(first, 3).shape == (16, 20, 3)
    assert not np.array_equal(pixels(first, 3), pixels(plain, 3))
    assert not np.array_equal(pixels(first, 3), pixels(dataset_of(paths, augment=True, seed=8), 3))
    second.set_epoch(1)
    assert not np.array_equal(pixels(first, 3), pixels(second, 3))


def test_augmentation_differs_across_indices():
    draws = {draw_augmentation(np.random.default_rng((0, 0, index))) for index in range(20)}
    assert len(draws) == 20
    for augmentation in draws:
        assert abs(augmentation.rotation_degrees) <= 5
        factors = dict(augmentation.jitter_factors)
        assert 0.7 <= factors["brightness"] <= 1.3 and 0.6 <= factors["contrast"] <= 1.4
        assert 0.5 <= factors["saturation"] <= 1.5


def test_dataloader_workers_match_single_process(tmp_path):
    paths = [make_episode(tmp_path / f"ep{i}.hdf5", length=6, seed=i, sim=bool(i % 2)) for i in range(3)]
    dataset = dataset_of(paths)
    dataset[0]  # the parent holds an open handle when the workers fork

    def load(workers):
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=workers, collate_fn=list)
        return [sample for batch in loader for sample in batch]

    serial, parallel = load(0), load(2)
    assert len(serial) == len(parallel) == 18
    for a, b in zip(serial, parallel):
        assert a.source == b.source and a.instruction == b.instruction and a.reasoning == b.reasoning
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.is_pad, b.is_pad)
        np.testing.assert_array_equal(a.state, b.state)
        np.testing.assert_array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_stats_streamed_equal_numpy_on_concatenation(tmp_path):
    lengths = (7, 12, 5)
    paths = [make_episode(tmp_path / f"ep{i}.hdf5", length=n, seed=i) for i, n in enumerate(lengths)]
    stats = compute_stats(hdf5_episodes(paths))
    actions = np.concatenate([episode_arrays(n, i)[0] for i, n in enumerate(lengths)]).astype(np.float64)
    qpos = np.concatenate([episode_arrays(n, i)[1] for i, n in enumerate(lengths)]).astype(np.float64)
    assert (stats.episodes, stats.frames) == (3, 24)
    for got, expected in [
        (stats.action_min, actions.min(0)),
        (stats.action_max, actions.max(0)),
        (stats.action_mean, actions.mean(0)),
        (stats.action_std, actions.std(0)),
        (stats.state_mean, qpos.mean(0)),
        (stats.state_std, qpos.std(0)),
        (stats.state_min, qpos.min(0)),
        (stats.state_max, qpos.max(0)),
    ]:
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_constant_dimensions_normalise_finitely(tmp_path):
    path = tmp_path / "still.hdf5"
    write_episode(
        path,
        actions=np.ones((4, ACTION_DIM)),
        qpos=np.ones((4, STATE_DIM)),
        images={"top": smooth_frames(4)},
        language="stay",
        sim=True,
    )
    sample = dataset_of([path])[0]
    assert np.isfinite(sample.actions).all() and np.isfinite(sample.state).all()


def test_stats_json_round_trip(tmp_path):
    stats = compute_stats(hdf5_episodes([make_episode(tmp_path / "ep.hdf5")]))
    loaded = NormStats.load(stats.save(tmp_path / "stats.json"))
    for name, value in vars(stats).items():
        np.testing.assert_array_equal(getattr(loaded, name), value)


@pytest.mark.parametrize(
    "content, field",
    [
        ("{not json", "not a JSON"),
        ('{"action_min": [1.0]}', "action_max: missing"),
        ('{"action_min": "x"}', "action_min: expected"),
    ],
)
def test_stats_load_names_file_and_field(tmp_path, content, field):
    stats_file = tmp_path / "stats.json"
    stats_file.write_text(content)
    with pytest.raises(VlaflowError, match=f"^{re.escape(str(stats_file))}: {field}"):
        NormStats.load(stats_file)


def without(path, key):
    with h5py.File(path, "a") as file:
        del file[key]
    return path


@pytest.mark.parametrize(
    "prepare, spec_change, message",
    [
        (lambda p: without(p, ACTION), {}, "/action: missing"),
        (lambda p: p, {"action_dim": 14}, "/action: dimension 4, the config says 14"),
        (lambda p: p, {"state_dim": 7}, "/observations/qpos: dimension 3, the config says 7"),
        (
            lambda p: p,
            {"cameras": ("top", "wrist")},
            "/observations/images/wrist: camera missing (episode has: left, top)",
        ),
        (lambda p: without(p, "language_raw"), {}, "/language_raw: missing"),
    ],
)
def test_inspect_episode_names_file_and_field(tmp_path, prepare, spec_change, message):
    path = prepare(make_episode(tmp_path / "ep3.hdf5", cameras=("top", "left")))
    spec = RobotSpec(**{**vars(SPEC), **spec_change})
    with pytest.raises(VlaflowError) as error:
        episode(path).inspect(spec)
    assert str(error.value) == f"{path}: {message}"


def test_inspect_episode_reports_contents(tmp_path):
    path = make_episode(tmp_path / "ep.hdf5", cameras=("top", "left"), sim=False, reasoning="why")
    info = episode(path).inspect(SPEC)
    assert (info.frames, info.sim, info.action_dim, info.state_dim) == (10, False, ACTION_DIM, STATE_DIM)
    assert info.cameras == ("left", "top") and info.image_shapes == {"top": (24, 32, 3)}
    assert (info.compressed, info.instruction, info.reasoning, info.has_substep_reasonings) == (
        False,
        "task 0",
        "why",
        False,
    )


def test_nan_in_actions_named_by_stats(tmp_path):
    path = make_episode(tmp_path / "ep.hdf5")
    with h5py.File(path, "a") as file:
        file[ACTION][6, 1] = np.nan
    with pytest.raises(VlaflowError, match=f"^{re.escape(str(path))}: /action: NaN or infinite value at frame 6$"):
        compute_stats(hdf5_episodes([path]))


def test_not_an_hdf5_file(tmp_path):
    path = tmp_path / "ep.hdf5"
    path.write_text("not hdf5")
    with pytest.raises(VlaflowError, match=f"^{re.escape(str(path))}: not a readable HDF5 file"):
        episode(path).inspect(SPEC)
    with pytest.raises(VlaflowError, match=f"^{re.escape(str(path))}: not a readable HDF5 file"):
        compute_stats(hdf5_episodes([path]))


def test_corrupt_jpeg_named_by_frame_check_and_loading(tmp_path):
    path = make_episode(tmp_path / "ep.hdf5", compress=True)
    with h5py.File(path, "a") as file:
        file[f"{IMAGES}/top"][4] = 7
    dataset = dataset_of([path])  # shapes alone look fine
    message = f"^{re.escape(str(path))}: /observations/images/top: frame 4 does not decode"
    with pytest.raises(VlaflowError, match=message):
        episode(path).check_decode(SPEC)
    with pytest.raises(VlaflowError, match=message):
        dataset[4]


def test_list_episode_files(tmp_path):
    make_episode(tmp_path / "b" / "ep1.h5")
    make_episode(tmp_path / "a.hdf5")
    (tmp_path / "notes.txt").write_text("")
    assert list_episode_files(tmp_path) == [tmp_path / "a.hdf5", tmp_path / "b" / "ep1.h5"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(VlaflowError, match=f"^{re.escape(str(tmp_path / 'empty'))}: no episode files"):
        list_episode_files(tmp_path / "empty")


def test_no_episodes_is_an_error(tmp_path):
    stats = compute_stats(hdf5_episodes([make_episode(tmp_path / "ep.hdf5")]))
    with pytest.raises(VlaflowError, match="no robot episodes"):
        RobotEpisodeDataset([], SPEC, stats)
    with pytest.raises(VlaflowError, match="no episodes"):
        compute_stats([])


RELATIVE_SPEC = RobotSpec(cameras=("top",), image_size=(16, 20), action_dim=3, state_dim=3, chunk_size=CHUNK)


@pytest.mark.parametrize("sim", [True, False])
def test_relative_actions_are_offsets_from_the_observed_state_within_their_range(tmp_path, sim):
    paths = [make_episode(tmp_path / f"{seed}.hdf5", sim=sim, seed=seed, action_dim=3, state_dim=3) for seed in (1, 2)]
    stats = compute_stats(hdf5_episodes(paths), delta_horizon=CHUNK)
    offsets = []  # every action of every chunk a sample can hold, minus its sample's state
    for seed in (1, 2):
        actions, qpos = episode_arrays(10, seed, 3, 3)
        for t in range(10):
            start = t if sim else max(t - 1, 0)
            offsets.append(actions[start : start + CHUNK] - qpos[t])
    offsets = np.concatenate(offsets)
    assert stats.relative and stats.delta_horizon == CHUNK
    # the range covers both chunk starts (sim and real) at once; this episode kind's offsets lie inside it
    assert (stats.delta_min <= offsets.min(axis=0) + 1e-6).all() and (
        stats.delta_max >= offsets.max(axis=0) - 1e-6
    ).all()
    dataset = RobotEpisodeDataset(hdf5_episodes(paths), RELATIVE_SPEC, stats)
    actions, qpos = episode_arrays(10, 1, 3, 3)
    sample = dataset[3]
    state = stats.unnormalize_state(sample.state)
    np.testing.assert_allclose(state, qpos[3], rtol=1e-5)
    start = 3 if sim else 2
    np.testing.assert_allclose(
        stats.unnormalize_actions(sample.actions, state), actions[start : start + CHUNK], atol=1e-4
    )
    np.testing.assert_allclose(
        stats.normalize_actions(actions[start : start + CHUNK], qpos[3]), sample.actions, atol=1e-5
    )
    everything = np.concatenate([dataset[i].actions[~dataset[i].is_pad] for i in range(len(dataset))])
    assert everything.min() >= -1 - 1e-6 and everything.max() <= 1 + 1e-6
    # holding the observed joint positions is a chunk of offsets 0, not the absolute range's midpoint
    held = stats.normalize_actions(np.repeat(qpos[None, 3], CHUNK, axis=0), qpos[3])
    np.testing.assert_allclose(
        stats.unnormalize_actions(held, qpos[3]), np.repeat(qpos[None, 3], CHUNK, axis=0), atol=1e-5
    )


def test_relative_actions_batch_and_need_the_state(tmp_path):
    path = make_episode(tmp_path / "ep.hdf5", action_dim=3, state_dim=3)
    stats = compute_stats(hdf5_episodes([path]), delta_horizon=CHUNK)
    chunks = np.repeat(np.random.default_rng(0).uniform(-1, 1, size=(1, CHUNK, 3)), 2, axis=0)
    states = np.array([[0.0, 1.0, 2.0], [5.0, -5.0, 0.5]])
    batched = stats.unnormalize_actions(chunks, states)
    for row in range(2):
        np.testing.assert_allclose(batched[row], stats.unnormalize_actions(chunks[row], states[row]), atol=1e-6)
    np.testing.assert_allclose(batched[1] - batched[0], np.broadcast_to(states[1] - states[0], (CHUNK, 3)), atol=1e-5)
    with pytest.raises(ValueError, match="relative actions"):
        stats.unnormalize_actions(chunks)


def test_relative_actions_need_one_action_per_state_dimension(tmp_path):
    path = make_episode(tmp_path / "ep.hdf5")  # 4 actions, 3 state values
    with pytest.raises(VlaflowError, match=f"^{re.escape(str(path))}: /action: dimension 4, /observations/qpos has 3"):
        compute_stats(hdf5_episodes([path]), delta_horizon=CHUNK)


def test_relative_statistics_round_trip_and_older_files_read_as_absolute(tmp_path):
    path = make_episode(tmp_path / "ep.hdf5", action_dim=3, state_dim=3)
    relative = compute_stats(hdf5_episodes([path]), delta_horizon=CHUNK)
    loaded = NormStats.load(relative.save(tmp_path / "relative.json"))
    assert loaded.delta_horizon == CHUNK
    np.testing.assert_array_equal(loaded.delta_min, relative.delta_min)
    np.testing.assert_array_equal(loaded.delta_max, relative.delta_max)
    absolute = json.loads(compute_stats(hdf5_episodes([path])).save(tmp_path / "absolute.json").read_text())
    assert "delta_min" not in absolute
    del absolute["delta_horizon"]  # as written before relative actions existed
    (tmp_path / "older.json").write_text(json.dumps(absolute))
    assert not NormStats.load(tmp_path / "older.json").relative
    content = json.loads((tmp_path / "relative.json").read_text())
    del content["delta_max"]
    (tmp_path / "broken.json").write_text(json.dumps(content))
    with pytest.raises(VlaflowError, match="broken.json: delta_max: missing"):
        NormStats.load(tmp_path / "broken.json")
