"""Where the shipped model is found: $MELANOMA_MODEL, the repository beside the source tree (an editable
install), else models/default under the working folder (a wheel installed from a clone, run there)."""

import shutil

import melanoma_detector.inference.bundle as bundle_mod


def test_default_bundle_is_found_beside_the_source_then_in_the_working_folder(tmp_path, monkeypatch):
    shipped = bundle_mod._REPO_BUNDLE
    monkeypatch.delenv("MELANOMA_MODEL", raising=False)
    assert bundle_mod.default_bundle_dir() == shipped
    # As from a wheel: no bundle beside the installed package, one in the clone it is run from.
    monkeypatch.setattr(bundle_mod, "_REPO_BUNDLE", tmp_path / "site-packages" / "models" / "default")
    clone = tmp_path / "clone"
    (clone / "models" / "default").mkdir(parents=True)
    shutil.copy(shipped / "metadata.json", clone / "models" / "default" / "metadata.json")
    monkeypatch.chdir(clone)
    assert bundle_mod.default_bundle_dir() == clone / "models" / "default"
    monkeypatch.chdir(tmp_path)  # elsewhere: the path the error message names
    assert bundle_mod.default_bundle_dir() == tmp_path / "site-packages" / "models" / "default"
    monkeypatch.setenv("MELANOMA_MODEL", str(tmp_path / "mine"))
    assert bundle_mod.default_bundle_dir() == tmp_path / "mine"
