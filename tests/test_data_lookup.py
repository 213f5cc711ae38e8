"""Where data are found: a configured folder, $PRUNERZERO_DATA, shared/data beside the checkout, then the hub."""

from pathlib import Path

from prunerzero import data


def test_shared_data_beside_the_checkout_is_found_from_any_working_folder(tmp_path, monkeypatch):
    # a checkout at tmp/checkout with shared/data beside it, run from a folder elsewhere
    checkout = tmp_path / "checkout"
    (checkout / "prunerzero").mkdir(parents=True)
    valid = tmp_path / "shared" / "data" / "wikitext-2" / "wiki.valid.raw"
    valid.parent.mkdir(parents=True)
    valid.write_text(" a line . \n")
    elsewhere = tmp_path / "elsewhere" / "deeper"
    elsewhere.mkdir(parents=True)
    monkeypatch.delenv("PRUNERZERO_DATA", raising=False)
    monkeypatch.setattr(data, "__file__", str(checkout / "prunerzero" / "data.py"))
    monkeypatch.chdir(elsewhere)
    assert data.find_data_file("wikitext-2/wiki.valid.raw") == valid
    assert data.data_roots()[0] == tmp_path / "shared" / "data"
    # a configured folder and $PRUNERZERO_DATA come first, in that order
    monkeypatch.setenv("PRUNERZERO_DATA", str(tmp_path / "env"))
    assert data.data_roots(tmp_path / "given")[:3] == [tmp_path / "given", tmp_path / "env", tmp_path / "shared" / "data"]
    assert Path(data.find_data_file("wikitext-2/wiki.valid.raw")) == valid
