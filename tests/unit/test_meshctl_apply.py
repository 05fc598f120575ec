"""``meshctl apply -f`` / ``meshctl delete -f`` on a config directory, with Istio's own sample files."""

from __future__ import annotations

import io
from pathlib import Path

from mesh.cli.main import main
from mesh.config.loader import load_dir
from mesh.config.validate import validate

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "istio-samples"


def meshctl(capsys, *argv) -> tuple:
    """``(exit code, stdout, stderr)`` of meshctl."""
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _state(config_dir) -> dict:
    """``{(kind, namespace, name): spec}`` of a valid config directory."""
    loaded = load_dir(config_dir)
    objects, errors = validate(loaded.resources)
    assert loaded.errors == [] and errors == []
    return {(r.kind, r.namespace, r.name): r.spec for r in loaded.resources}


def test_the_request_routing_task_applies_istio_files_one_after_the_other(tmp_path, capsys):
    """kubectl apply's semantics: the second file replaces the reviews VirtualService of the first."""
    for sample in ("destination-rule-all.yaml", "virtual-service-all-v1.yaml"):
        code, out, err = meshctl(capsys, "apply", "-f", str(SAMPLES / sample), "--config-dir", str(tmp_path))
        assert code == 0, err
    assert "virtualservice/reviews (namespace default) created" in out
    code, out, err = meshctl(capsys, "apply", "-f", str(SAMPLES / "virtual-service-reviews-test-v2.yaml"),
                             "--config-dir", str(tmp_path))
    assert (code, out) == (0, "virtualservice/reviews (namespace default) configured\n"), err
    state = _state(tmp_path)
    reviews = state[("VirtualService", "default", "reviews")]
    assert reviews["http"][0]["match"][0]["headers"]["end-user"] == {"exact": "jason"}
    assert len([key for key in state if key[0] == "VirtualService"]) == 4  # productpage, reviews, ratings, details
    code, out, _ = meshctl(capsys, "apply", "-f", str(SAMPLES / "virtual-service-reviews-test-v2.yaml"),
                           "--config-dir", str(tmp_path))
    assert (code, out) == (0, "virtualservice/reviews (namespace default) unchanged\n")


def test_delete_removes_what_a_file_defines(tmp_path, capsys):
    meshctl(capsys, "apply", "-f", str(SAMPLES / "virtual-service-all-v1.yaml"), "--config-dir", str(tmp_path))
    code, out, err = meshctl(capsys, "delete", "-f", str(SAMPLES / "virtual-service-all-v1.yaml"),
                             "--config-dir", str(tmp_path))
    assert code == 0, err
    assert out.count(" deleted") == 4 and _state(tmp_path) == {}
    code, _, err = meshctl(capsys, "delete", "-f", str(SAMPLES / "virtual-service-all-v1.yaml"),
                           "--config-dir", str(tmp_path))
    assert code == 1 and "virtualservice/productpage (namespace default) is not in" in err


def test_an_invalid_file_writes_nothing_and_names_each_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\n"
                   "spec: {hosts: [r], http: [{route: [{destination: {host: r}}], timeout: fast}]}\n")
    config = tmp_path / "config"
    config.mkdir()
    code, _, err = meshctl(capsys, "apply", "-f", str(bad), "--config-dir", str(config))
    assert code == 1 and f"{bad}:4: VirtualService/default/r: " in err and "nothing was written" in err
    assert list(config.iterdir()) == []


def test_a_resource_among_others_in_one_file_is_not_touched(tmp_path, capsys):
    config = tmp_path / "config"
    config.mkdir()
    (config / "bookinfo.yaml").write_text((SAMPLES / "virtual-service-all-v1.yaml").read_text())
    before = (config / "bookinfo.yaml").read_text()
    code, _, err = meshctl(capsys, "apply", "-f", str(SAMPLES / "virtual-service-reviews-test-v2.yaml"),
                           "--config-dir", str(config))
    assert code == 1 and "bookinfo.yaml:" in err and "among other resources" in err and "move it" in err
    assert sorted(path.name for path in config.iterdir()) == ["bookinfo.yaml"]
    assert (config / "bookinfo.yaml").read_text() == before


def test_namespace_and_stdin(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO((SAMPLES / "virtual-service-reviews-v3.yaml").read_text()))
    code, out, err = meshctl(capsys, "apply", "-f", "-", "-n", "bookinfo", "--config-dir", str(tmp_path))
    assert (code, out) == (0, "virtualservice/reviews (namespace bookinfo) created\n"), err
    assert list(_state(tmp_path)) == [("VirtualService", "bookinfo", "reviews")]
    assert [path.name for path in tmp_path.iterdir()] == ["virtualservice-bookinfo-reviews.yaml"]


def test_without_a_local_control_plane_it_says_to_start_one(tmp_path, capsys):
    code, _, err = meshctl(capsys, "apply", "-f", str(SAMPLES / "virtual-service-reviews-v3.yaml"),
                           "--state-dir", str(tmp_path))
    assert code == 1 and "meshctl up" in err
