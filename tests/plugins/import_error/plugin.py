raise RuntimeError("import-time failure of the import_error fixture")
