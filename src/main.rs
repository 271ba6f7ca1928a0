//! The `logcursor` binary: the library's [`logcursor::Service`] with no Rust
//! handlers (an application that has some builds the same thing with
//! `Service::new().handler(…)`; see `examples/payments`).

fn main() -> std::process::ExitCode {
    logcursor::Service::new().run()
}
