//! The scripts the README's Quick start runs: `scripts/services` finds the services where the
//! tests look for them and says which one does not answer. (Starting and installing services is
//! not exercised here: the shared services are never stopped for a test.)

use std::{net::TcpListener, path::PathBuf, process::Command};

fn services(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/services");
    let out = Command::new("bash").arg(script).args(args).envs(env.iter().copied()).output().expect("bash runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// A loopback port nobody listens on.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

#[test]
fn status_reads_the_test_urls_and_names_the_service_that_does_not_answer() {
    let port = closed_port();
    let url = format!("redis://127.0.0.1:{port}/");
    let (code, text) = services(&["status"], &[("WXPUSH_TEST_REDIS_URL", &url)]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains(&format!("Redis: not answering on 127.0.0.1:{port}")), "{text}");
    assert!(!text.contains("RabbitMQ: not answering"), "{text}");
}

#[test]
fn status_finds_the_services_the_suite_runs_against() {
    let (code, text) = services(&["status"], &[]);
    assert_eq!(code, 0, "RabbitMQ and Redis run for the test suite: {text}");
    assert!(text.contains("RabbitMQ: up on") && text.contains("Redis: up on"), "{text}");
}

#[test]
fn usage_without_a_command() {
    let (code, text) = services(&[], &[]);
    assert_eq!(code, 2);
    assert!(text.contains("scripts/services up"), "{text}");
}
