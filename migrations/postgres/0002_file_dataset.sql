-- See migrations/sqlite/0002_file_dataset.sql.
ALTER TABLE files ADD COLUMN dataset JSONB;
