"""The batch-archive benchmark, `python -m bench archive`, and the seeding it shares with the
tests: a batch whose rows (through `db/` helpers) and result objects (put in parallel) are made
directly, without uploading or rendering, so a batch of 100,000 images takes minutes to set up.

The benchmark reads every object of such a batch with the minio client, then downloads the
batch's archive from a real API process (gunicorn) while sampling that process's RSS, then cuts a
download at 60 % and resumes it with `Range`, checking the file against the first one."""

from __future__ import annotations

import hashlib
import uuid
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from common.formats import CONTENT_TYPE_BY_FORMAT
from common.renditions import Rendition
from common.storage import ObjectStore, rendition_key
from db import batches, images
from db.batches import NewBatch
from db.images import NewImage, Outcome, StoredRendition
from db.pool import Database

ROWS_PER_STATEMENT = 1000


@dataclass(frozen=True)
class SeedImage:
    """One image of a seeded batch: the bytes of each rendition it has (by name), or the reason
    it failed (`outputs` then unused). `crc_kept`: False to leave `crc32` out of its rows, as
    for a rendition stored before CRCs were kept."""

    filename: str
    outputs: dict[str, bytes]
    failure: str | None = None
    crc_kept: bool = True


def seed_batch(
    db: Database,
    store: ObjectStore,
    owner: str,
    seeds: Sequence[SeedImage],
    renditions: Sequence[Rendition],
    *,
    threads: int = 16,
) -> uuid.UUID:
    """A closed batch of `owner` holding `seeds`, its result objects stored; returns its id."""
    batch_id = uuid.uuid4()
    with db.transaction() as conn:
        batches.create_batch(conn, NewBatch(batch_id, owner, "seeded", None, ["batch"], None))
    ids = [uuid.uuid4() for _ in seeds]
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(seeds), ROWS_PER_STATEMENT):
            chunk = list(zip(ids[start:], seeds[start : start + ROWS_PER_STATEMENT], strict=False))
            outcomes = list(pool.map(lambda pair: _stored(store, renditions, *pair), chunk))
            with db.transaction() as conn:
                images.insert_images(conn, [_new_image(i, owner, s, batch_id) for i, s in chunk])
                images.commit_batch(conn, outcomes)
    with db.transaction() as conn:
        batches.close_batch(conn, batch_id)
    return batch_id


def _new_image(image_id: uuid.UUID, owner: str, seed: SeedImage, batch_id: uuid.UUID) -> NewImage:
    return NewImage(
        id=image_id,
        owner=owner,
        filename=seed.filename,
        content_type="image/jpeg",
        size_bytes=1000,
        sha256=hashlib.sha256(image_id.bytes).hexdigest(),
        source_width=64,
        source_height=48,
        original_key=f"originals/{image_id}",
        batch_id=batch_id,
    )


def _stored(
    store: ObjectStore, renditions: Sequence[Rendition], image_id: uuid.UUID, seed: SeedImage
) -> Outcome:
    if seed.failure is not None:
        return Outcome(image_id, "failed", error=seed.failure)
    made = []
    for index, rendition in enumerate(renditions):
        data = seed.outputs.get(rendition.name)
        if data is None:
            continue
        content_type = CONTENT_TYPE_BY_FORMAT[rendition.format]
        key = rendition_key(image_id, rendition.name, content_type, first=index == 0)
        store.put_result(key, data, content_type)
        crc = zlib.crc32(data) if seed.crc_kept else None
        made.append(StoredRendition(rendition.name, key, content_type, 64, 48, len(data), crc))
    main = made[0]
    return Outcome(
        image_id,
        "completed",
        result_key=main.key,
        result_content_type=main.content_type,
        result_width=main.width,
        result_height=main.height,
        renditions=tuple(made),
        result_size_bytes=sum(r.bytes or 0 for r in made),
    )
