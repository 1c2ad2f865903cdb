-- Batch archives (`GET /api/v1/batches/{id}/archive`, see ingest/archive.py).
--
-- Each object of `images.renditions` gains `crc32`, the CRC-32 of the stored bytes, written by
-- the engine as it stores them: with every size and CRC in the rows, an archive's central
-- directory (and so any byte range of it) follows from the rows without reading an object.
-- Renditions stored before this have none; the archive computes theirs once and writes it back.
COMMENT ON COLUMN images.renditions IS
    'stored outputs: [{name, key, content_type, width, height, bytes, crc32}], first rendition first';

-- An archive entry's name comes from the original filename: its stem (the name without its last
-- extension) with the characters unsafe in a file name replaced (ingest/archive.py). Images
-- whose stems could give the same entry name, even differing only in ASCII case, share a group:
-- the stem with every character that replacement touches or writes deleted, ASCII letters
-- lowered. The archive lists images by (group, id), so clashing names are neighbours and are
-- told apart with constant memory. The set of characters here is ingest/archive.py's
-- REPLACED_CHARACTERS: change both together.
CREATE FUNCTION archive_stem(filename text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT regexp_replace(filename, '\.[^./\\]*$', '')
$$;

-- Built-in functions only, the stem's expression written out again: an index expression must
-- not depend on the search path (autovacuum's ANALYZE and pg_restore run without this schema
-- on it).
CREATE FUNCTION archive_group(filename text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT translate(
        regexp_replace(regexp_replace(filename, '\.[^./\\]*$', ''),
                       '[\x01-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069/\\:*?"<>|~._]',
                       '', 'g'),
        'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')
$$;

-- A batch's completed images in archive order, read a page at a time.
CREATE INDEX images_batch_archive_idx
    ON images (batch_id, (archive_group(filename) COLLATE "C"), id)
    WHERE status = 'completed' AND batch_id IS NOT NULL;
