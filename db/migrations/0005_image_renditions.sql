-- Renditions: the outputs made of an image (name, key, content type, size, bytes each), and the
-- subset an upload asked for (comma-separated names; NULL for every configured rendition).
ALTER TABLE images ADD COLUMN renditions jsonb NOT NULL DEFAULT '[]'::jsonb;
ALTER TABLE images ADD COLUMN requested_renditions text;

-- Images completed before renditions have one: `default`, the TARGET_WIDTH / OUTPUT_FORMAT
-- result. Its size in bytes was never recorded.
UPDATE images
   SET renditions = jsonb_build_array(jsonb_build_object(
           'name', 'default', 'key', result_key, 'content_type', result_content_type,
           'width', result_width, 'height', result_height, 'bytes', NULL))
 WHERE status = 'completed' AND result_key IS NOT NULL;
