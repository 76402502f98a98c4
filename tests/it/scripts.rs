//! The scripts the README's Quick start runs, and the test harness' services: `scripts/services`
//! finds the services where the tests look for them and says which one does not answer, and a
//! test binary whose services do not answer stops with one line saying how to start them.
//! (Starting and installing services is not exercised here: the shared services are never
//! stopped for a test.)

use crate::harness::{is_alone, run_alone, services};

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

#[test]
fn without_services_a_test_binary_stops_with_one_line_saying_how_to_start_them() {
    const TEST: &str = "scripts::without_services_a_test_binary_stops_with_one_line_saying_how_to_start_them";
    if is_alone(TEST) {
        // In the process started below: the first use of the services ends it.
        let _ = services::amqp_url();
        return;
    }
    let port = closed_port();
    let out = run_alone(TEST, &[("WXPUSH_TEST_REDIS_URL", format!("redis://127.0.0.1:{port}/"))]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(out.status.code(), Some(2), "the binary stops at once: {stderr}");
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    let line = lines[0];
    assert!(line.starts_with(&format!("Redis on 127.0.0.1:{port} (WXPUSH_TEST_REDIS_URL) does not answer")), "{line}");
    assert!(line.contains("scripts/services up") && line.contains("cargo test --lib"), "{line}");
    assert!(!line.contains("RabbitMQ on"), "RabbitMQ answers: {line}");
}
