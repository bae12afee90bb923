"""Training loop, schedule, History and checkpoints (course_lib.train, course_lib.checkpoint)."""

import math
import os

import pytest
import torch

from course_lib.checkpoint import CheckpointError, UnsafeCheckpointError, load_checkpoint, save_checkpoint
from course_lib.train import History, TrainConfig, make_optimizer, train, warmup_cosine_schedule

torch.set_num_threads(1)

DIM = 8
TRUE_WEIGHT = torch.linspace(-1.0, 1.0, DIM).unsqueeze(1)  # (DIM, 1) the target linear map


class TinyRegressor(torch.nn.Module):
    """Linear -> Dropout -> Linear; forward(batch) returns the MSE loss (and a logged extra scalar)."""

    def __init__(self, dropout: float = 0.3, hidden: int = 16):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(DIM, hidden), torch.nn.Dropout(dropout), torch.nn.Linear(hidden, 1)
        )

    def forward(self, batch):
        x, y = batch["x"], batch["y"]
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        return {"loss": loss, "mean_target": y.mean(), "logits": x}  # logits: non-scalar, ignored


def make_batch(index: int, batch_size: int = 16) -> dict:
    """Deterministic batch for step ``index`` (its own generator, so it draws nothing from the global RNG)."""
    g = torch.Generator().manual_seed(1000 + index)
    x = torch.randn(batch_size, DIM, generator=g)
    y = x @ TRUE_WEIGHT + 0.01 * torch.randn(batch_size, 1, generator=g)
    return {"x": x, "y": y}


def quiet_config(**overrides) -> TrainConfig:
    return TrainConfig(**{"progress": False, "log_every": 0, "device": "cpu", **overrides})


def new_model(seed: int, dropout: float = 0.3) -> TinyRegressor:
    torch.manual_seed(seed)
    return TinyRegressor(dropout)


# ---------------------------------------------------------------- learning


def test_loss_goes_down_and_history_records_every_step():
    model = new_model(0)
    history = train(model, make_batch, quiet_config(steps=150, lr=1e-2, warmup_steps=10))
    assert len(history) == 150
    assert history.steps == list(range(1, 151))
    first, last = sum(history.losses[:10]) / 10, history.mean_last(10)
    # Measured ratio last/first ~0.03 (dropout keeps some noise); 0.15 leaves a wide margin.
    assert last < 0.15 * first, (first, last)
    assert set(history.records[0]) == {"step", "loss", "lr", "mean_target", "grad_norm"}
    assert history.last("lr") == pytest.approx(1e-2 * warmup_cosine_factor(149, 10, 150, 0.0), rel=1e-12)
    assert history.records[0]["mean_target"] == pytest.approx(make_batch(0)["y"].mean().item(), abs=1e-6)


def warmup_cosine_factor(step, warmup, total, floor):
    """The schedule written out once more, independently of the library's lambda."""
    if step < warmup:
        return (step + 1) / warmup
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


def test_warmup_cosine_hand_values():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    lrs = []
    for _ in range(7):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # Hand-computed: warmup 2 * (1/2, 2/2); then cosine over 4 steps to a floor of 0.1 * 2:
    # s=3: 2 * (0.1 + 0.9 * 0.5 * (1 + cos(pi/4))) = 2 * 0.868198...; s=4: 2 * 0.55; s=6: 2 * 0.1
    assert lrs[0] == pytest.approx(1.0, abs=1e-12)
    assert lrs[1] == pytest.approx(2.0, abs=1e-12)
    assert lrs[2] == pytest.approx(2.0, abs=1e-12)
    assert lrs[3] == pytest.approx(1.7363961030678928, abs=1e-12)
    assert lrs[4] == pytest.approx(1.1, abs=1e-12)
    assert lrs[6] == pytest.approx(0.2, abs=1e-12)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        warmup_cosine_schedule(optimizer, 0, 10, min_lr_ratio=1.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine_schedule(optimizer, 11, 10)


def test_make_optimizer_decays_only_matrices():
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3))
    optimizer = make_optimizer(model, TrainConfig(steps=1, weight_decay=0.05))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert decayed == {id(model[0].weight), id(model[2].weight)}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 5


# ---------------------------------------------------------------- accumulation


def test_two_micro_batches_of_4_equal_one_batch_of_8():
    big = make_batch(0, batch_size=8)
    halves = [{k: v[:4] for k, v in big.items()}, {k: v[4:] for k, v in big.items()}]
    model_one, model_two = new_model(1, dropout=0.0), new_model(1, dropout=0.0)
    h_one = train(model_one, lambda i: big, quiet_config(steps=1, grad_clip=None))
    h_two = train(model_two, lambda i: halves[i], quiet_config(steps=1, grad_clip=None, accumulation_steps=2))
    # Gradients (left in .grad after the last step), updated weights and logged loss agree to 1e-6.
    for p_one, p_two in zip(model_one.parameters(), model_two.parameters()):
        torch.testing.assert_close(p_two.grad, p_one.grad, atol=1e-6, rtol=0)
        torch.testing.assert_close(p_two, p_one, atol=1e-6, rtol=0)
    assert h_two.losses[0] == pytest.approx(h_one.losses[0], abs=1e-6)


# ---------------------------------------------------------------- resume exactness


class Crash(Exception):
    pass


def crash_at(index, data):
    """Wrap data so fetching micro-batch ``index`` raises, like a job killed mid-run."""
    if callable(data):
        def crashing(i):
            if i == index:
                raise Crash
            return data(i)
        return crashing

    class Crashing:
        def __iter__(self):
            for count, batch in enumerate(_cycle(data)):
                if count == index:
                    raise Crash
                yield batch
    return Crashing()


def _cycle(items):
    while True:
        yield from items


@pytest.mark.parametrize("kind", ["callable", "iterable"])
def test_resume_gives_exactly_the_uninterrupted_losses(tmp_path, kind):
    data = make_batch if kind == "callable" else [make_batch(i) for i in range(4)]  # 4 batches: cycles
    common = dict(steps=10, lr=1e-2, warmup_steps=2, min_lr_ratio=0.1)
    reference_model = new_model(0)
    reference = train(reference_model, data, quiet_config(**common))

    path = tmp_path / "ckpt.pt"
    config = quiet_config(**common, checkpoint_path=path, checkpoint_every=3)
    with pytest.raises(Crash):  # dies fetching the batch of step 7, after the step-6 checkpoint
        train(new_model(0), crash_at(6, data), config)
    assert load_checkpoint(path, new_model(5), restore_rng=False)["step"] == 6

    # A different init: weights, optimizer moments, lr and the RNG (dropout masks) must all come
    # from the checkpoint. (Loading with restore_rng=False makes this test fail: checked.)
    resumed_model = new_model(99)
    resumed = train(resumed_model, data, config, resume=True)
    assert resumed.records == reference.records  # exact float equality, step by step
    for p_ref, p_res in zip(reference_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p_ref, p_res)


def test_resume_with_more_steps_follows_the_new_schedule(tmp_path):
    path = tmp_path / "ckpt.pt"
    train(new_model(0), make_batch, quiet_config(steps=4, lr=1e-2, checkpoint_path=path, checkpoint_every=4))
    longer = train(new_model(0), make_batch, quiet_config(steps=8, lr=1e-2, checkpoint_path=path), resume=True)
    assert longer.steps == list(range(1, 9))
    # Steps 5..8 use the 8-step cosine (0-based s = 4..7), not the finished 4-step one.
    assert [r["lr"] for r in longer.records[4:]] == pytest.approx(
        [1e-2 * warmup_cosine_factor(s, 0, 8, 0.0) for s in range(4, 8)], rel=1e-12
    )
    done = train(new_model(0), make_batch, quiet_config(steps=4, checkpoint_path=path), resume=True)
    assert done.steps == [1, 2, 3, 4]  # the checkpoint is already at step 4: nothing left to do


def test_resume_without_checkpoint_starts_fresh(tmp_path, capsys):
    config = quiet_config(steps=3, checkpoint_path=tmp_path / "none.pt")
    assert train(new_model(0), make_batch, config, resume=True).steps == [1, 2, 3]
    assert "starting fresh" in capsys.readouterr().out


# ---------------------------------------------------------------- nothing lost, nothing silent


def test_a_run_without_resume_refuses_to_replace_a_checkpoint(tmp_path, capsys):
    # The fault: a step-8 checkpoint was silently replaced by a step-2 one.
    path = tmp_path / "ckpt.pt"
    train(new_model(0), make_batch, quiet_config(steps=8, checkpoint_path=path, checkpoint_every=4))
    assert "starting fresh; checkpoints go to" in capsys.readouterr().out
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"ckpt\.pt already exists.*resume=True to continue it, overwrite=True"):
        train(new_model(0), make_batch, quiet_config(steps=2, checkpoint_path=path, checkpoint_every=1))
    assert path.read_bytes() == before
    assert load_checkpoint(path, new_model(0), restore_rng=False)["step"] == 8
    # Saying so replaces it; a run that saves nothing may share the path.
    train(new_model(0), make_batch, quiet_config(steps=2, checkpoint_path=path, checkpoint_every=1), overwrite=True)
    assert "overwrite=True: checkpoint" in capsys.readouterr().out
    assert load_checkpoint(path, new_model(0), restore_rng=False)["step"] == 2
    train(new_model(0), make_batch, quiet_config(steps=2, checkpoint_path=path))
    with pytest.raises(ValueError, match="resume=True and overwrite=True contradict"):
        train(new_model(0), make_batch, quiet_config(steps=2, checkpoint_path=path), resume=True, overwrite=True)


def test_resume_prints_its_step_and_refuses_fewer_steps_than_the_checkpoint(tmp_path, capsys):
    # The fault: resuming a step-6 checkpoint with steps=3 returned at once, training nothing.
    path = tmp_path / "ckpt.pt"
    train(new_model(0), make_batch, quiet_config(steps=6, checkpoint_path=path, checkpoint_every=6))
    with pytest.raises(ValueError, match=r"at step 6, beyond steps=3.*steps >= 6"):
        train(new_model(0), make_batch, quiet_config(steps=3, checkpoint_path=path), resume=True)
    capsys.readouterr()
    train(new_model(0), make_batch, quiet_config(steps=6, checkpoint_path=path), resume=True)
    assert "resuming from step 6 of checkpoint" in capsys.readouterr().out


def test_resume_from_a_dangling_symlink_is_an_error(tmp_path):
    # The fault: the run started from step 1 and its first save replaced the link.
    link = tmp_path / "ckpt.pt"
    link.symlink_to(tmp_path / "elsewhere" / "ckpt.pt")
    config = quiet_config(steps=3, checkpoint_path=link, checkpoint_every=1)
    with pytest.raises(ValueError, match=r"symlink to .*elsewhere/ckpt\.pt, which does not exist"):
        train(new_model(0), make_batch, config, resume=True)
    with pytest.raises(ValueError, match="symlink"):
        train(new_model(0), make_batch, config)
    assert link.is_symlink() and not link.exists()  # left as it was


def test_a_killed_save_leaves_no_temp_file_after_resume(tmp_path):
    path = tmp_path / "ckpt.pt"
    train(new_model(0), make_batch, quiet_config(steps=2, checkpoint_path=path, checkpoint_every=2))
    (tmp_path / ".ckpt.pt.abc123.tmp").write_bytes(b"half a checkpoint")  # what kill -9 mid-save leaves
    train(new_model(0), make_batch, quiet_config(steps=3, checkpoint_path=path, checkpoint_every=1), resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


# ---------------------------------------------------------------- checkpoints


def test_atomic_save_keeps_old_checkpoint_when_save_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    model = new_model(0)
    save_checkpoint(path, model, step=1, extra={"note": "old"})
    old_bytes = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")  # the temp file exists and is partly written
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, new_model(1), step=2)
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the temp file was removed
    restored = new_model(2)
    state = load_checkpoint(path, restored, restore_rng=False)
    assert state["step"] == 1 and state["extra"] == {"note": "old"}
    for p, q in zip(model.parameters(), restored.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_restores_optimizer_scheduler_rng_and_unwraps(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    model = new_model(0)
    config = TrainConfig(steps=5, warmup_steps=2)
    optimizer = make_optimizer(model, config)
    scheduler = warmup_cosine_schedule(optimizer, 2, 5)
    model(make_batch(0))["loss"].backward()
    optimizer.step()
    scheduler.step()
    wrapped = torch.nn.DataParallel(model)  # saved keys must not start with "module."
    save_checkpoint(path, wrapped, optimizer, scheduler, step=1, history=History([{"step": 1, "loss": 0.5}]))
    expected_draw = torch.rand(3)

    model2 = new_model(1)
    optimizer2 = make_optimizer(model2, config)
    scheduler2 = warmup_cosine_schedule(optimizer2, 2, 5)
    state = load_checkpoint(path, model2, optimizer2, scheduler2)
    assert torch.equal(torch.rand(3), expected_draw)  # RNG restored to the moment of saving
    assert state["step"] == 1 and History.from_dict(state["history"]).losses == [0.5]
    assert scheduler2.last_epoch == 1
    assert optimizer2.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert all(not k.startswith("module.") for k in torch.load(path, weights_only=True)["model"])
    save_checkpoint(path, torch.compile(model))  # compiled lazily: nothing is compiled here
    assert list(torch.load(path, weights_only=True)["model"]) == list(model.state_dict())


def test_missing_checkpoint_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt", new_model(0))


@pytest.mark.parametrize("damage", ["random_bytes", "truncated", "empty", "not_a_checkpoint"])
def test_corrupt_checkpoint_raises_checkpoint_error(tmp_path, damage):
    path = tmp_path / "bad.pt"
    save_checkpoint(path, new_model(0), step=3)
    good = path.read_bytes()
    if damage == "random_bytes":
        path.write_bytes(os.urandom(2000))
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match=r"bad\.pt.*corrupt or incomplete"):
        load_checkpoint(path, new_model(0))
    assert issubclass(CheckpointError, ValueError)


class Payload:
    """A pickled object whose unpickling runs code: what weights_only loading must stop."""

    def __reduce__(self):
        return (os.system, ("echo this must never run",))


@pytest.mark.parametrize("payload", ["os.system", "a class"])
def test_refused_pickle_is_reported_as_unsafe_not_corrupt(tmp_path, payload):
    # The fault: torch 2.13 words it "unsupported GLOBAL ... blocked"; it was reported as corrupt,
    # with advice to delete it.
    path = tmp_path / "foreign.pt"
    save_checkpoint(path, new_model(0), step=3)
    state = torch.load(path, weights_only=True)
    state["extra"] = {"note": Payload() if payload == "os.system" else History()}
    torch.save(state, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path, new_model(0))
    message = str(info.value)
    assert "objects that weights_only loading does not allow" in message
    assert ("posix.system" in message or "nt.system" in message) if payload == "os.system" else "History" in message
    assert "corrupt" not in message and "delete" not in message
    assert isinstance(info.value, CheckpointError)


def test_mismatched_model_lists_keys(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, new_model(0))
    other = torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.Linear(16, 2))
    with pytest.raises(ValueError, match=r"missing keys.*'0\.weight'.*unexpected keys.*'net\.0\.weight'"):
        load_checkpoint(path, other)
    with pytest.raises(ValueError, match=r"shape mismatches.*net\.0\.weight"):
        load_checkpoint(path, TinyRegressor(hidden=4))


# ---------------------------------------------------------------- bad inputs


def test_empty_data_raises():
    with pytest.raises(ValueError, match="data yielded no batches"):
        train(new_model(0), [], quiet_config(steps=2))
    one_shot = (make_batch(i) for i in range(2))  # a generator cannot be re-iterated
    with pytest.raises(ValueError, match="data yielded no batches when iterated again"):
        train(new_model(0), one_shot, quiet_config(steps=3))


def test_nan_loss_raises_naming_the_step():
    def poisoned(i):
        batch = make_batch(i)
        if i == 2:  # the batch of step 3
            batch["y"][0, 0] = float("nan")
        return batch

    with pytest.raises(FloatingPointError, match="step 3"):
        train(new_model(0), poisoned, quiet_config(steps=5))


def test_plain_tensor_loss_and_loss_fn():
    model = torch.nn.Linear(DIM, 1)
    history = train(
        model,
        lambda i: (make_batch(i)["x"], make_batch(i)["y"]),
        quiet_config(steps=3),
        loss_fn=lambda m, batch: torch.nn.functional.mse_loss(m(batch[0]), batch[1]),
    )
    assert set(history.records[-1]) == {"step", "loss", "lr", "grad_norm"}


@pytest.mark.parametrize(
    "field, value",
    [
        ("steps", 0), ("lr", -1.0), ("lr", float("nan")), ("weight_decay", -0.1), ("betas", (1.5, 0.9)),
        ("warmup_steps", -1), ("warmup_steps", 20), ("min_lr_ratio", 2.0), ("grad_clip", -1.0),
        ("accumulation_steps", 0), ("bf16", "yes"), ("compile", "no"), ("device", 5), ("log_every", -1),
        ("checkpoint_path", 3), ("checkpoint_every", -1), ("seed", -1), ("progress", "x"),
    ],
)
def test_bad_config_field_raises_naming_it(field, value):
    kwargs = {"steps": 10, field: value}
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kwargs)


def test_checkpoint_every_needs_a_path_and_resume_needs_a_path():
    with pytest.raises(ValueError, match="checkpoint_path"):
        TrainConfig(steps=5, checkpoint_every=2)
    with pytest.raises(ValueError, match="checkpoint_path"):
        train(new_model(0), make_batch, quiet_config(steps=2), resume=True)


def test_history_helpers():
    history = History([{"step": 1, "loss": 4.0}, {"step": 2, "loss": 2.0, "acc": 0.5}, {"step": 3, "loss": 1.0}])
    assert history.losses == [4.0, 2.0, 1.0]
    assert history.last("acc") == 0.5
    assert history.mean_last(2) == 1.5
    assert history.mean_last(10) == pytest.approx(7 / 3)
    assert History.from_dict(history.to_dict()).records == history.records
    with pytest.raises(ValueError, match="key='recall'"):
        history.last("recall")
    with pytest.raises(ValueError, match="n must"):
        history.mean_last(0)
