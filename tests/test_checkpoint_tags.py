from checkpoints_utils.checkpoint import COMPLETE, latest_tag


def make(root, tag, complete=True):
    (root / "checkpoints" / tag).mkdir(parents=True)
    if complete:
        (root / "checkpoints" / tag / COMPLETE).write_text("2\n")


def test_latest_ignores_incomplete_checkpoints(tmp_path):
    assert latest_tag(tmp_path) is None
    make(tmp_path, "step_000010")
    make(tmp_path, "step_000020")
    make(tmp_path, "step_000030", complete=False)
    (tmp_path / "checkpoints" / "latest").write_text("step_000030\n")  # a save killed before COMPLETE
    assert latest_tag(tmp_path) == "step_000020"
    (tmp_path / "checkpoints" / "latest").write_text("step_000010\n")
    assert latest_tag(tmp_path) == "step_000010"
