-- What an uploaded dataset holds, as the upload validator found it (JSON, NULL for files
-- stored before this column or that failed validation): {"kind": "text" | … | "images"}, and
-- for images {"format", "classes": [names], "train_examples", "validation_examples",
-- "split"}. A job's files and the classification endpoint read the class list from here.
ALTER TABLE files ADD COLUMN dataset TEXT;
