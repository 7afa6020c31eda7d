-- PostgreSQL announces changed zaps to the other processes sharing it. An
-- SQLite file has one process, which forgets what it changes itself: this
-- migration keeps the numbering of both schemas in step.
SELECT 1;
