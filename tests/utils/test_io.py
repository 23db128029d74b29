def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    target = tmp_path / "calibration.json"
    target.write_text("good")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["calibration.json"]  # no temporary file left behind
