"""include/ is found next to plugins/, on Composer's data/ mount, or where DICOM_INCLUDE_DIR says."""

from __future__ import annotations

from dicom_archive import resources


def test_include_dir_defaults_to_the_folder_beside_plugins(monkeypatch):
    monkeypatch.delenv("DICOM_INCLUDE_DIR", raising=False)
    assert resources.include_dir() == resources.BESIDE_PLUGINS
    assert (resources.include_dir() / "schemas" / "dicom.json").is_file()


def test_include_dir_falls_back_to_composer_data_mount(monkeypatch, tmp_path):
    composer = tmp_path / "gcs" / "data" / "include"
    composer.mkdir(parents=True)
    monkeypatch.delenv("DICOM_INCLUDE_DIR", raising=False)
    monkeypatch.setattr(resources, "BESIDE_PLUGINS", tmp_path / "absent")
    monkeypatch.setattr(resources, "COMPOSER_DATA", composer)
    assert resources.include_dir() == composer


def test_include_dir_setting_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("DICOM_INCLUDE_DIR", str(tmp_path))
    assert resources.include_dir() == tmp_path
