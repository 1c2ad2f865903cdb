-- Renditions: the outputs made of an image (name, key, content type, size, bytes each), and the
-- subset an upload asked for (comma-separated names; NULL for every configured rendition).
ALTER TABLE images ADD COLUMN renditions jsonb NOT NULL DEFAULT '[]'::jsonb;
ALTER TABLE images ADD COLUMN requested_renditions text;
