"""`cliptune data download flickr30k`: fetch the `nlphuji/flickr30k` hub dataset and lay it out.

The hub repo holds `flickr_annotations_30k.csv` (Karpathy splits; 5 captions per image in `raw`)
and `flickr30k-images.zip`. They are fetched with huggingface_hub (resumable, cached), the archive
is unpacked safely (no member may escape the target folder), and the result is checked: every
image the CSV names must be there.
"""

from __future__ import annotations

import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cliptune.config import DataConfig
from cliptune.data.readers import FLICKR30K_IMAGE_FOLDER, read_split

FLICKR30K_REPO = "nlphuji/flickr30k"
FLICKR30K_CSV = "flickr_annotations_30k.csv"
FLICKR30K_ZIP = "flickr30k-images.zip"


@dataclass
class Layout:
    annotations: Path
    image_root: Path
    images_per_split: dict[str, int]

    def config_lines(self) -> str:
        return f"data:\n  path: {self.annotations}\n  image_root: {self.image_root}\n"


def download_flickr30k(out_dir: Path, revision: str | None = None) -> Layout:
    """Download (or reuse the hub cache) and unpack Flickr30k into `out_dir`."""
    from huggingface_hub import hf_hub_download

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = hf_hub_download(FLICKR30K_REPO, FLICKR30K_CSV, repo_type="dataset", revision=revision)
    zip_path = hf_hub_download(FLICKR30K_REPO, FLICKR30K_ZIP, repo_type="dataset", revision=revision)
    return lay_out_flickr30k(Path(csv_path), Path(zip_path), out_dir)


def lay_out_flickr30k(csv_path: Path, zip_path: Path, out_dir: Path) -> Layout:
    """Copy the CSV, unpack the images into `out_dir/flickr30k-images/`, and verify the splits."""
    out_dir.mkdir(parents=True, exist_ok=True)
    annotations = out_dir / FLICKR30K_CSV
    shutil.copyfile(csv_path, annotations)
    image_root = out_dir / FLICKR30K_IMAGE_FOLDER
    extract_images(zip_path, image_root)
    counts = {}
    # No image_root: checked the way `cliptune eval --data <csv>` will read it (the folder beside the CSV).
    config = DataConfig(path=str(annotations), format="flickr30k_csv")
    for split in ("train", "val", "test"):
        records, _ = read_split(config, split)
        missing = [r.image_path for r in records if not r.image_path.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images of split {split!r} are not in {zip_path} "
                                    f"(first: {missing[0].name})")
        counts[split] = len(records)
    return Layout(annotations, image_root, counts)


def extract_images(zip_path: Path, image_root: Path) -> int:
    """Unpack image files flat into `image_root` (the archive's own folder prefix is dropped).
    Returns how many were written; files already present with the same size are skipped."""
    image_root.mkdir(parents=True, exist_ok=True)
    written = 0
    with zipfile.ZipFile(zip_path) as archive:
        for member in archive.infolist():
            if member.is_dir():
                continue
            name = Path(member.filename).name
            if not name or name.startswith(".") or "__MACOSX" in member.filename:
                continue
            target = image_root / name  # flat: a member can never escape image_root
            if target.is_file() and target.stat().st_size == member.file_size:
                continue
            tmp = target.with_suffix(target.suffix + ".part")
            with archive.open(member) as source, open(tmp, "wb") as sink:
                shutil.copyfileobj(source, sink)
            tmp.replace(target)
            written += 1
    return written
