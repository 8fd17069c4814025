-- Dagster's storage in a database of its own beside the catalog's (both use Alembic, whose
-- version table would clash in one database). Run once, when the data folder is new.
CREATE DATABASE dagster OWNER vbs;
