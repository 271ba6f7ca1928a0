-- The Rust handlers a stream's events have been written with (see
-- src/write/guard.rs). A program that does not run every handler recorded
-- here refuses to write the stream (store, replay or rewind its events):
-- the stock binary, or an older build, would otherwise store events without
-- the effects an application's handler gives them. A handler joins the
-- record the first time a program that runs it writes the stream; one is
-- removed only by an operator (`logcursor retire-handler`).
ALTER TABLE block_cursors ADD COLUMN rust_handlers text[] NOT NULL DEFAULT '{}';
