-- Most images belong to no batch. The batch triggers run for every statement on `images` (the
-- engine's claim and commit of every batch of images included), so they return at once when
-- the statement touched no image of a batch, instead of joining and aggregating its rows.
CREATE OR REPLACE FUNCTION images_batch_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM new_rows WHERE batch_id IS NOT NULL) THEN
        RETURN NULL;
    END IF;
    PERFORM apply_batch_deltas(batch_deltas_of(
        (SELECT coalesce(jsonb_agg(n), '[]') FROM new_rows AS n WHERE n.batch_id IS NOT NULL),
        '[]'));
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION images_batch_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM old_rows WHERE batch_id IS NOT NULL) THEN
        RETURN NULL;
    END IF;
    PERFORM apply_batch_deltas(batch_deltas_of(
        '[]',
        (SELECT coalesce(jsonb_agg(o), '[]') FROM old_rows AS o WHERE o.batch_id IS NOT NULL)));
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION images_batch_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM new_rows WHERE batch_id IS NOT NULL)
       AND NOT EXISTS (SELECT 1 FROM old_rows WHERE batch_id IS NOT NULL) THEN
        RETURN NULL;
    END IF;
    INSERT INTO webhook_deliveries (batch_id, event_type, image_id)
    SELECT n.batch_id, 'image.' || n.status, n.id
      FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id
      JOIN batches AS b ON b.id = n.batch_id
     WHERE n.status IS DISTINCT FROM o.status AND n.status IN ('completed', 'failed')
       AND b.callback_url IS NOT NULL AND 'image' = ANY(b.events);
    PERFORM apply_batch_deltas(batch_deltas_of(
        (SELECT coalesce(jsonb_agg(n), '[]') FROM new_rows AS n JOIN old_rows AS o USING (id)
          WHERE n.batch_id IS NOT NULL AND (n.status IS DISTINCT FROM o.status
                OR n.result_size_bytes IS DISTINCT FROM o.result_size_bytes)),
        (SELECT coalesce(jsonb_agg(o), '[]') FROM old_rows AS o JOIN new_rows AS n USING (id)
          WHERE o.batch_id IS NOT NULL AND (n.status IS DISTINCT FROM o.status
                OR n.result_size_bytes IS DISTINCT FROM o.result_size_bytes))));
    RETURN NULL;
END $$;
