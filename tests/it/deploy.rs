//! The deploy files agree with the code: every YAML under deploy/ parses; the compose file, the
//! Kubernetes manifests and the Dockerfile name only programs, `WXPUSH_*` variables and ports the
//! crate has; the image ships every program; pods outlive the shutdown grace; KEDA scales on the
//! jobs queue; the Grafana dashboard queries only metrics the code emits, and covers them all.
//!
//! None of this needs Docker or a cluster: the files are read as data and checked against what
//! the sources say (bin targets, string literals, metric macros) and against `Config` itself.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use crate::harness::{is_alone, run_alone};
use crate::wx::{Config, ENV_VARS, install_metrics};
use serde::Deserialize;
use serde_json::Value;

/// The ports the programs listen on or connect to: webhook, worker metrics, webhook admin,
/// sandbox, RabbitMQ (AMQP and management), Redis.
const PORTS: &[u16] = &[8080, 9100, 9101, 9300, 5672, 15672, 6379];

/// Variables the deploy files may set that are not the programs' own `WXPUSH_*`.
const OTHER_VARIABLES: &[&str] = &["RUST_LOG"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// Files under `dir` (relative to the crate root), recursively, whose names end in one of `exts`.
fn files_under(dir: &str, exts: &[&str]) -> Vec<PathBuf> {
    fn walk(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, exts, out);
            } else if exts.iter().any(|e| path.to_string_lossy().ends_with(e)) {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join(dir), exts, &mut out);
    out.sort();
    out
}

fn rust_sources() -> Vec<(PathBuf, String)> {
    files_under("src", &[".rs"]).into_iter().map(|p| (p.clone(), std::fs::read_to_string(&p).unwrap())).collect()
}

fn cargo_toml() -> toml::Table {
    read("Cargo.toml").parse().expect("Cargo.toml parses")
}

/// Bin targets: `[[bin]]` entries and `src/bin/*.rs` (or `src/bin/*/main.rs`).
fn bin_targets() -> BTreeSet<String> {
    let mut bins = BTreeSet::new();
    if let Some(list) = cargo_toml().get("bin").and_then(|b| b.as_array()) {
        bins.extend(list.iter().filter_map(|b| b.get("name")?.as_str().map(str::to_owned)));
    }
    for entry in std::fs::read_dir(root().join("src/bin")).expect("src/bin").flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "rs") {
            bins.insert(path.file_stem().unwrap().to_string_lossy().into_owned());
        } else if path.join("main.rs").exists() {
            bins.insert(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    bins
}

/// The programs the image ships: every binary but the developers' benchmark tools.
fn shipped_binaries() -> BTreeSet<String> {
    bin_targets().into_iter().filter(|b| !b.ends_with("-bench")).collect()
}

/// Every `WXPUSH_*` variable the code reads: string literals in src/ (clap `env = "…"`,
/// `std::env::var("…")`, constants) plus `config::ENV_VARS`.
fn variables_read() -> BTreeSet<String> {
    let mut vars: BTreeSet<String> = ENV_VARS.iter().map(|(v, _)| (*v).to_owned()).collect();
    for (_, text) in rust_sources() {
        for (i, _) in text.match_indices("\"WXPUSH_") {
            let rest = &text[i + 1..];
            let end = rest.find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')).unwrap();
            if rest[end..].starts_with('"') {
                vars.insert(rest[..end].to_owned());
            }
        }
    }
    vars
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric the code emits: the name literal right after `counter!(`, `gauge!(` or `histogram!(`.
fn emitted_metrics() -> BTreeMap<String, MetricKind> {
    let mut out = BTreeMap::new();
    for (path, text) in rust_sources() {
        for (mac, kind) in
            [("counter!(", MetricKind::Counter), ("gauge!(", MetricKind::Gauge), ("histogram!(", MetricKind::Histogram)]
        {
            for (i, _) in text.match_indices(mac) {
                let rest = text[i + mac.len()..].trim_start();
                let Some(rest) = rest.strip_prefix('"') else { continue };
                let name = &rest[..rest.find('"').unwrap()];
                if let Some(other) = out.insert(name.to_owned(), kind) {
                    assert_eq!(other, kind, "{name} is emitted as two kinds ({})", path.display());
                }
            }
        }
    }
    out
}

/// The documents of a YAML file as JSON values, with `<<` merge keys applied (compose uses them).
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut docs = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(&text).enumerate() {
        let mut value = serde_norway::Value::deserialize(doc)
            .unwrap_or_else(|e| panic!("{} document {i} is not valid YAML: {e}", path.display()));
        value.apply_merge().unwrap_or_else(|e| panic!("{} document {i}: bad merge key: {e}", path.display()));
        if value.is_null() {
            continue;
        }
        docs.push(
            serde_json::to_value(&value)
                .unwrap_or_else(|e| panic!("{} document {i} has non-string keys: {e}", path.display())),
        );
    }
    docs
}

fn k8s_documents() -> Vec<Value> {
    files_under("deploy/kubernetes", &[".yaml", ".yml"])
        .iter()
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .flat_map(|p| yaml_documents(p))
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    of_kind(docs, kind)
        .into_iter()
        .find(|d| d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} named {name} in deploy/kubernetes"))
}

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("expected a scalar, found {other}"),
    }
}

/// A string-to-string map from a YAML mapping (compose `environment`, ConfigMap `data`), or
/// from a compose list of `KEY=VALUE`.
fn string_map(v: &Value) -> BTreeMap<String, String> {
    match v {
        Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), str_of(v))).collect(),
        Value::Array(items) => items
            .iter()
            .map(|i| {
                let s = str_of(i);
                let (k, v) = s.split_once('=').unwrap_or((&s, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        Value::Null => BTreeMap::new(),
        other => panic!("expected a map, found {other}"),
    }
}

/// A command as words, from a YAML list or a string.
fn words(v: &Value) -> Vec<String> {
    match v {
        Value::Array(items) => items.iter().map(str_of).collect(),
        Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        Value::Null => Vec::new(),
        other => panic!("expected a command, found {other}"),
    }
}

/// Checks the names of an environment: the programs' own variables, or an allowed other one.
fn assert_known_variables<'a>(place: &str, names: impl IntoIterator<Item = &'a String>, read: &BTreeSet<String>) {
    for name in names {
        if name.starts_with("WXPUSH_") {
            assert!(read.contains(name), "{place} sets {name}, which no program reads (known: {read:?})");
        } else {
            assert!(OTHER_VARIABLES.contains(&name.as_str()), "{place} sets {name}, which no program reads");
        }
    }
}

/// Explicit ports in URL values (`amqp://…:5672/`) are the programs' ports.
fn assert_url_ports(place: &str, values: impl IntoIterator<Item = String>) {
    for value in values {
        for word in value.split_whitespace().filter(|w| w.contains("://")) {
            let url = url::Url::parse(word).unwrap_or_else(|e| panic!("{place}: {word} is not a URL: {e}"));
            if let Some(port) = url.port() {
                assert!(PORTS.contains(&port), "{place}: {word} uses port {port}, which no program has");
            }
        }
    }
}

/// What `Config::load` would make of this environment and file, as the program would see it.
fn effective_config(place: &str, toml_text: &str, env: &BTreeMap<String, String>) -> Config {
    Config::from_sources(place, toml_text, |var| env.get(var).cloned())
        .unwrap_or_else(|e| panic!("{place}: the programs would refuse this configuration: {e}"))
}

/// Compose durations: `30s`, `1m30s`, `500ms`.
fn compose_duration_secs(text: &str) -> f64 {
    let (mut total, mut number) = (0.0, String::new());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let n: f64 = number.parse().unwrap_or_else(|_| panic!("bad duration {text}"));
        number.clear();
        total += match c {
            'h' => n * 3600.0,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                n / 1000.0
            }
            'm' => n * 60.0,
            's' => n,
            _ => panic!("bad duration {text}"),
        };
    }
    assert!(number.is_empty(), "duration {text} lacks a unit");
    total
}

#[test]
fn every_yaml_file_under_deploy_parses() {
    let files = files_under("deploy", &[".yaml", ".yml"]);
    assert!(files.len() >= 8, "compose and the Kubernetes manifests: {files:?}");
    for file in &files {
        let docs = yaml_documents(file);
        assert!(!docs.is_empty(), "{} is empty", file.display());
        for doc in &docs {
            assert!(doc.is_object(), "{}: a document is not a mapping", file.display());
            if file.starts_with(root().join("deploy/kubernetes")) {
                for key in ["apiVersion", "kind"] {
                    assert!(doc[key].is_string(), "{}: a document has no {key}", file.display());
                }
                if doc["kind"] != "Kustomization" {
                    assert!(doc["metadata"]["name"].is_string(), "{}: a document has no name", file.display());
                }
            }
        }
    }
    // kubectl apply -k applies every manifest there is.
    let kustomization = &yaml_documents(&root().join("deploy/kubernetes/kustomization.yaml"))[0];
    let listed: BTreeSet<String> = kustomization["resources"].as_array().unwrap().iter().map(str_of).collect();
    let present: BTreeSet<String> = files_under("deploy/kubernetes", &[".yaml", ".yml"])
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|n| n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "kustomization.yaml lists every manifest");
}

#[test]
fn compose_runs_the_demo_with_real_programs_variables_and_ports() {
    let compose = &yaml_documents(&root().join("deploy/docker-compose.yml"))[0];
    let services = compose["services"].as_object().expect("services");
    let bins = bin_targets();
    let read = variables_read();
    let service = |name: &str| services.get(name).unwrap_or_else(|| panic!("compose has no service {name}"));

    let rabbitmq = service("rabbitmq");
    assert!(str_of(&rabbitmq["image"]).starts_with("rabbitmq:") && str_of(&rabbitmq["image"]).contains("-management"));
    assert!(rabbitmq["healthcheck"]["test"].is_array(), "RabbitMQ has a healthcheck");
    let redis = service("redis");
    assert!(str_of(&redis["image"]).starts_with("redis:7."));
    assert!(redis["healthcheck"]["test"].is_array(), "Redis has a healthcheck");

    let mut programs = BTreeMap::new();
    for (name, svc) in services {
        let ours = svc.get("build").is_some() || str_of(&svc["image"]).starts_with("wxpush");
        let env = string_map(&svc["environment"]);
        assert_url_ports(&format!("compose service {name}"), env.values().cloned());
        for port in svc["ports"].as_array().into_iter().flatten().chain(svc["expose"].as_array().into_iter().flatten())
        {
            let spec = str_of(port);
            let parts: Vec<&str> = spec.split(':').collect();
            // "HOST_IP:HOST_PORT:CONTAINER_PORT" publishes on one address only.
            let ports = if parts.len() == 3 { &parts[1..] } else { &parts[..] };
            for part in ports {
                let n: u16 = part.split('/').next().unwrap().parse().expect("a port number");
                assert!(PORTS.contains(&n), "compose service {name} publishes port {n}, which no program has");
            }
        }
        for (dep, how) in svc["depends_on"].as_object().into_iter().flatten() {
            let target = service(dep);
            if how["condition"] == "service_healthy" {
                assert!(
                    target["healthcheck"]["test"].is_array(),
                    "{name} waits for {dep} to be healthy: it needs a healthcheck"
                );
            }
        }
        if !ours {
            continue;
        }
        // No command: the image's CMD, the worker.
        let command = words(&svc["command"]);
        let program = command.first().cloned().unwrap_or_else(|| "wxpush-worker".into());
        assert!(bins.contains(&program), "compose service {name} runs {program}, which is not a bin target ({bins:?})");
        assert_known_variables(&format!("compose service {name}"), env.keys(), &read);
        assert_url_ports(&format!("compose service {name}"), command.iter().cloned());
        programs.insert(program, (name.clone(), svc, env, command));
    }

    let (_, worker, worker_env, _) = &programs["wxpush-worker"];
    assert_eq!(worker["deploy"]["replicas"], 3, "three workers");
    for dep in ["rabbitmq", "redis"] {
        assert_eq!(worker["depends_on"][dep]["condition"], "service_healthy", "workers wait for {dep}");
    }
    let config = effective_config("compose worker", "", worker_env);
    let api = url::Url::parse(&config.wechat_api_base).unwrap();
    let (sandbox_name, sandbox, sandbox_env, sandbox_cmd) = &programs["wxpush-sandbox"];
    assert_eq!(api.host_str(), Some(sandbox_name.as_str()), "the workers talk to the sandbox");
    let flag = |flag: &str| {
        let i = sandbox_cmd.iter().position(|w| w == flag).unwrap_or_else(|| panic!("sandbox has no {flag}"));
        sandbox_cmd[i + 1].clone()
    };
    let listen: std::net::SocketAddr = flag("--listen").parse().unwrap();
    assert_eq!(api.port(), Some(listen.port()), "the workers' WXPUSH_WECHAT_API_BASE is the sandbox's port");
    assert!(listen.ip().is_unspecified(), "the sandbox listens beyond its container");
    assert!(sandbox["ports"].is_array());
    assert_eq!(url::Url::parse(&config.amqp_url).unwrap().host_str(), Some("rabbitmq"));
    assert_eq!(url::Url::parse(&config.redis_url).unwrap().host_str(), Some("redis"));
    let grace = compose_duration_secs(&str_of(&worker["stop_grace_period"]));
    assert!(grace > config.shutdown_grace.as_secs_f64(), "Docker's SIGKILL ({grace} s) comes after the worker's grace");

    let (webhook_name, webhook, webhook_env, _) = &programs["wxpush-webhook"];
    let webhook_config = effective_config("compose webhook", "", webhook_env);
    let hook = url::Url::parse(&flag("--webhook")).unwrap();
    assert_eq!(hook.host_str(), Some(webhook_name.as_str()), "the sandbox pushes receipts to the webhook");
    assert_eq!(hook.port(), Some(webhook_config.webhook_listen.port()));
    assert_eq!(hook.path(), "/wechat", "the URL of the account `default`");
    assert!(webhook_config.webhook_listen.ip().is_unspecified());
    let grace = compose_duration_secs(&str_of(&webhook["stop_grace_period"]));
    assert!(grace > webhook_config.shutdown_grace.as_secs_f64());
    // WeChat's port is published; the admin port (metrics, probes) stays inside the network,
    // and the healthcheck asks it.
    let admin = webhook_config.webhook_admin_listen;
    assert!(admin.ip().is_unspecified() && admin.port() != webhook_config.webhook_listen.port());
    let published: Vec<String> = webhook["ports"].as_array().unwrap().iter().map(str_of).collect();
    assert_eq!(
        published,
        [format!("{0}:{0}", webhook_config.webhook_listen.port())],
        "only WeChat's port is published"
    );
    assert!(webhook["expose"].as_array().unwrap().iter().any(|p| str_of(p) == admin.port().to_string()));
    let check = words(&webhook["healthcheck"]["test"]).join(" ");
    assert!(check.contains(&format!("/dev/tcp/127.0.0.1/{} ", admin.port())) && check.contains("/readyz"), "{check}");
    // The sandbox knows the account the workers send for, and signs receipts with the webhook's token.
    for var in ["WXPUSH_APPID", "WXPUSH_APPSECRET"] {
        assert_eq!(sandbox_env.get(var), worker_env.get(var), "{var}: sandbox and workers agree");
    }
    assert!(webhook_env.contains_key("WXPUSH_CALLBACK_TOKEN"));
    assert_eq!(sandbox_env.get("WXPUSH_CALLBACK_TOKEN"), webhook_env.get("WXPUSH_CALLBACK_TOKEN"));
    assert_eq!(sandbox_env.get("WXPUSH_APPID"), webhook_env.get("WXPUSH_APPID"));
}

/// The containers of a Deployment, with its pod spec.
fn containers(deployment: &Value) -> (&Value, Vec<&Value>) {
    let pod = &deployment["spec"]["template"]["spec"];
    (pod, pod["containers"].as_array().expect("containers").iter().collect())
}

/// The environment a container gets: envFrom ConfigMaps and Secrets, then `env`.
fn container_env(docs: &[Value], container: &Value) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for from in container["envFrom"].as_array().into_iter().flatten() {
        if let Some(name) = from["configMapRef"]["name"].as_str() {
            env.extend(string_map(&named(docs, "ConfigMap", name)["data"]));
        }
        if let Some(name) = from["secretRef"]["name"].as_str() {
            env.extend(string_map(&named(docs, "Secret", name)["stringData"]));
        }
    }
    for var in container["env"].as_array().into_iter().flatten() {
        env.insert(str_of(&var["name"]), var["value"].as_str().unwrap_or_default().to_owned());
    }
    env
}

/// The program a container runs (the image's CMD, the worker, when it names none).
fn program(container: &Value) -> String {
    words(&container["command"]).first().cloned().unwrap_or_else(|| "wxpush-worker".into())
}

fn deployment_running<'a>(docs: &'a [Value], bin: &str) -> &'a Value {
    of_kind(docs, "Deployment")
        .into_iter()
        .find(|d| containers(d).1.iter().any(|c| program(c) == bin))
        .unwrap_or_else(|| panic!("no Deployment runs {bin}"))
}

/// The configuration file a container is given: WXPUSH_CONFIG must point into a mounted ConfigMap.
fn mounted_config_file(docs: &[Value], pod: &Value, container: &Value, env: &BTreeMap<String, String>) -> String {
    let Some(path) = env.get("WXPUSH_CONFIG") else { return String::new() };
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let Some(key) = path.strip_prefix(&format!("{}/", str_of(&mount["mountPath"]))) else { continue };
        let volume = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == mount["name"])
            .expect("the mount's volume");
        let map = named(docs, "ConfigMap", volume["configMap"]["name"].as_str().expect("a ConfigMap volume"));
        return map["data"][key].as_str().unwrap_or_else(|| panic!("the ConfigMap has no key {key}")).to_owned();
    }
    panic!("WXPUSH_CONFIG={path} is not in a mounted volume")
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector.as_object().is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| &labels[k] == v))
}

#[test]
fn kubernetes_manifests_name_real_programs_variables_and_ports() {
    let docs = k8s_documents();
    let bins = bin_targets();
    let read = variables_read();
    for kind in ["Deployment", "Service", "ConfigMap", "Secret", "ScaledObject", "PodDisruptionBudget"] {
        assert!(!of_kind(&docs, kind).is_empty(), "deploy/kubernetes has a {kind}");
    }
    for map in of_kind(&docs, "ConfigMap").into_iter().chain(of_kind(&docs, "Secret")) {
        let name = str_of(&map["metadata"]["name"]);
        let data =
            string_map(&map["data"]).into_iter().chain(string_map(&map["stringData"])).collect::<BTreeMap<_, _>>();
        let vars: Vec<&String> =
            data.keys().filter(|k| k.chars().all(|c| c.is_ascii_uppercase() || c == '_')).collect();
        assert_known_variables(&format!("{} {name}", str_of(&map["kind"])), vars, &read);
        assert_url_ports(&name, data.values().cloned());
    }
    for deployment in of_kind(&docs, "Deployment") {
        let name = str_of(&deployment["metadata"]["name"]);
        let (pod, containers) = containers(deployment);
        let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
        assert!(labels_match(&deployment["spec"]["selector"]["matchLabels"], pod_labels), "{name}: selector");
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name} runs as non-root");
        assert!(pod["securityContext"]["runAsUser"].as_u64().is_some_and(|u| u > 0), "{name}: numeric non-root UID");
        let mut container_ports = BTreeMap::new();
        let mut health_ports = BTreeSet::new();
        for c in &containers {
            let bin = program(c);
            assert!(bins.contains(&bin), "{name} runs {bin}, which is not a bin target ({bins:?})");
            let own: Vec<String> = c["env"].as_array().into_iter().flatten().map(|v| str_of(&v["name"])).collect();
            assert_known_variables(&name, &own, &read);
            assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true, "{name}: read-only root fs");
            assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false, "{name}");
            for p in c["ports"].as_array().into_iter().flatten() {
                let n = p["containerPort"].as_u64().unwrap() as u16;
                assert!(PORTS.contains(&n), "{name} exposes port {n}, which no program has");
                container_ports.insert(p["name"].as_str().unwrap_or_default().to_owned(), n);
            }
            let env = container_env(&docs, c);
            let file = mounted_config_file(&docs, pod, c, &env);
            let config = effective_config(&name, &file, &env);
            // The webhook answers probes and scrapes on its admin address, never on WeChat's port.
            let (listen, health) = if bin == "wxpush-webhook" {
                (config.webhook_listen, config.webhook_admin_listen)
            } else {
                (config.metrics_listen, config.metrics_listen)
            };
            for addr in [listen, health] {
                assert!(
                    container_ports.values().any(|p| *p == addr.port()),
                    "{name} listens on {addr}: a container port"
                );
            }
            health_ports.insert(health.port());
            for probe in ["livenessProbe", "readinessProbe"] {
                let port = &c[probe]["httpGet"]["port"];
                let n = port.as_u64().map(|n| n as u16).or_else(|| container_ports.get(port.as_str()?).copied());
                assert_eq!(n, Some(health.port()), "{name}: {probe} asks the program's own health port");
            }
            assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{name}");
            assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{name}");
        }
        let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true", "{name} is scraped");
        let scraped: u16 = str_of(&annotations["prometheus.io/port"]).parse().unwrap();
        assert!(health_ports.contains(&scraped), "{name}: Prometheus scrapes the port that serves /metrics");
        assert_eq!(annotations["prometheus.io/path"], "/metrics");
    }
    for service in of_kind(&docs, "Service") {
        let name = str_of(&service["metadata"]["name"]);
        let selected: Vec<_> = of_kind(&docs, "Deployment")
            .into_iter()
            .filter(|d| labels_match(&service["spec"]["selector"], &d["spec"]["template"]["metadata"]["labels"]))
            .collect();
        assert_eq!(selected.len(), 1, "Service {name} selects one Deployment's pods");
        let (pod, containers) = containers(selected[0]);
        let webhook_admin = containers.iter().find(|c| program(c) == "wxpush-webhook").map(|c| {
            let env = container_env(&docs, c);
            effective_config(&name, &mounted_config_file(&docs, pod, c, &env), &env).webhook_admin_listen.port()
        });
        for p in service["spec"]["ports"].as_array().unwrap() {
            let port = p["port"].as_u64().unwrap() as u16;
            assert!(PORTS.contains(&port), "Service {name} port {port}");
            let target = &p["targetPort"];
            let found = containers
                .iter()
                .flat_map(|c| c["ports"].as_array().unwrap())
                .any(|cp| cp["name"] == *target || cp["containerPort"] == *target);
            assert!(found, "Service {name}: targetPort {target} is a container port");
            if let Some(admin) = webhook_admin {
                let admin_port = containers
                    .iter()
                    .flat_map(|c| c["ports"].as_array().unwrap())
                    .find(|cp| cp["containerPort"] == admin)
                    .expect("the webhook's admin port is a container port");
                let to_admin = *target == admin_port["name"] || *target == admin_port["containerPort"];
                assert!(!to_admin, "Service {name} must not expose the webhook's admin port (metrics, probes)");
            }
        }
    }
    for pdb in of_kind(&docs, "PodDisruptionBudget") {
        let selects = of_kind(&docs, "Deployment").into_iter().any(|d| {
            labels_match(&pdb["spec"]["selector"]["matchLabels"], &d["spec"]["template"]["metadata"]["labels"])
        });
        assert!(selects, "PodDisruptionBudget {} selects a Deployment's pods", pdb["metadata"]["name"]);
    }
    let worker = deployment_running(&docs, "wxpush-worker");
    assert!(
        of_kind(&docs, "PodDisruptionBudget").iter().any(|p| labels_match(
            &p["spec"]["selector"]["matchLabels"],
            &worker["spec"]["template"]["metadata"]["labels"]
        )),
        "the workers have a PodDisruptionBudget"
    );
    deployment_running(&docs, "wxpush-webhook");
}

#[test]
fn pods_outlive_the_shutdown_grace() {
    let docs = k8s_documents();
    for deployment in of_kind(&docs, "Deployment") {
        let name = str_of(&deployment["metadata"]["name"]);
        let (pod, containers) = containers(deployment);
        let termination = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        for c in containers {
            let env = container_env(&docs, c);
            let config = effective_config(&name, &mounted_config_file(&docs, pod, c, &env), &env);
            // A preStop hook's time counts against the same grace period.
            let pre_stop = words(&c["lifecycle"]["preStop"]["exec"]["command"]);
            let pre_stop_secs = match pre_stop.as_slice() {
                [sleep, secs] if sleep == "sleep" => secs.parse::<u64>().unwrap(),
                [] => 0,
                other => panic!("{name}: unexpected preStop {other:?}"),
            };
            assert!(
                termination > pre_stop_secs + config.shutdown_grace.as_secs(),
                "{name}: terminationGracePeriodSeconds {termination} must exceed the preStop {pre_stop_secs} s \
                 plus the shutdown grace {} s, or in-flight work is SIGKILLed",
                config.shutdown_grace.as_secs()
            );
        }
    }
}

#[test]
fn keda_scales_the_workers_on_the_jobs_queue() {
    let docs = k8s_documents();
    let worker = deployment_running(&docs, "wxpush-worker");
    let (pod, containers) = containers(worker);
    let env = container_env(&docs, containers[0]);
    let config = effective_config("worker", &mounted_config_file(&docs, pod, containers[0], &env), &env);
    let scaled = of_kind(&docs, "ScaledObject");
    assert_eq!(scaled.len(), 1);
    let scaled = scaled[0];
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], worker["metadata"]["name"], "KEDA scales the workers");
    let triggers = scaled["spec"]["triggers"].as_array().unwrap();
    assert!(!triggers.is_empty());
    for trigger in triggers {
        assert_eq!(trigger["type"], "rabbitmq");
        let meta = &trigger["metadata"];
        // QueueLength over AMQP needs no management API.
        assert_eq!(meta["mode"], "QueueLength");
        assert_eq!(meta["protocol"], "amqp");
        assert_eq!(str_of(&meta["queueName"]), config.jobs_queue, "the main jobs queue, not a delay queue");
        assert!(str_of(&meta["value"]).parse::<f64>().is_ok_and(|v| v > 0.0));
        let auth = named(&docs, "TriggerAuthentication", trigger["authenticationRef"]["name"].as_str().unwrap());
        let host = auth["spec"]["secretTargetRef"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["parameter"] == "host")
            .expect("the broker's address comes from a Secret");
        let secret = named(&docs, "Secret", host["name"].as_str().unwrap());
        let url = secret["stringData"][host["key"].as_str().unwrap()].as_str().expect("the Secret has the key");
        assert_eq!(keda_host_problem(url, &config.amqp_url), None);
    }
    // The queue is named once: kustomize copies the workers' WXPUSH_JOBS_QUEUE into the trigger.
    let kustomization = &yaml_documents(&root().join("deploy/kubernetes/kustomization.yaml"))[0];
    let copies_the_queue = kustomization["replacements"].as_array().into_iter().flatten().any(|r| {
        let source = &r["source"];
        source["kind"] == "ConfigMap"
            && source["fieldPath"] == "data.WXPUSH_JOBS_QUEUE"
            && named(&docs, "ConfigMap", &str_of(&source["name"]))["data"]["WXPUSH_JOBS_QUEUE"] == *config.jobs_queue
            && r["targets"].as_array().into_iter().flatten().any(|t| {
                t["select"]["kind"] == "ScaledObject"
                    && t["select"]["name"] == scaled["metadata"]["name"]
                    && t["fieldPaths"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|f| f == "spec.triggers.[type=rabbitmq].metadata.queueName")
            })
    });
    assert!(copies_the_queue, "kustomization.yaml copies the ConfigMap's WXPUSH_JOBS_QUEUE into queueName");
}

/// KEDA's RabbitMQ scaler takes one AMQP URL: not the workers' list of nodes, but one URL on
/// the same vhost (a node, or the Service in front of them). What is wrong with `keda`, if anything.
fn keda_host_problem(keda: &str, workers: &str) -> Option<String> {
    if keda.contains(',') {
        return Some(format!("KEDA's host is one URL, not a list of nodes: {keda}"));
    }
    let url = match url::Url::parse(keda) {
        Ok(url) if ["amqp", "amqps"].contains(&url.scheme()) => url,
        _ => return Some(format!("protocol amqp needs an amqp(s) URL: {keda}")),
    };
    workers
        .split(',')
        .map(|node| url::Url::parse(node.trim()).unwrap_or_else(|e| panic!("the workers' {node} is not a URL: {e}")))
        .find(|node| node.path() != url.path())
        .map(|node| format!("KEDA looks at vhost {}, the workers at {}", url.path(), node.path()))
}

#[test]
fn keda_takes_one_broker_url_when_the_workers_have_a_list() {
    let nodes = "amqp://u:p@rmq-0:5672/%2f,amqp://u:p@rmq-1:5672/%2f";
    assert_eq!(keda_host_problem("amqp://u:p@rabbitmq:5672/%2f", nodes), None);
    for wrong in [nodes, "amqp://u:p@rabbitmq:5672/other", "http://rabbitmq:15672/"] {
        assert!(keda_host_problem(wrong, nodes).is_some(), "{wrong} is refused as KEDA's host");
    }
}

/// An image reference with an exact version: a tag that starts with at least two numeric
/// components (`1.95.0-bookworm`, `12.15-slim`, `4.1.8-management`), never `latest`, `1` or `7`.
fn pinned(image: &str) -> bool {
    let Some((_, tag)) = image.split(" AS ").next().unwrap_or(image).rsplit_once(':') else { return false };
    let version = tag.split('-').next().unwrap_or_default();
    let parts: Vec<&str> = version.split('.').collect();
    parts.len() >= 2 && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
}

/// A `FROM` argument with the Dockerfile's `ARG` defaults filled in and the default registry
/// prefix (`docker.io/library/`) removed, as Docker would pull it without build arguments.
fn dockerfile_image(instructions: &[(String, String)], from: &str) -> String {
    let mut text = from.to_owned();
    for (_, arg) in instructions.iter().filter(|(k, _)| k == "ARG") {
        let (name, default) = arg.split_once('=').unwrap_or((arg, ""));
        text = text.replace(&format!("${{{name}}}"), default).replace(&format!("${name}"), default);
    }
    text.strip_prefix("docker.io/library/").map(str::to_owned).unwrap_or(text)
}

#[test]
fn every_base_image_is_pinned_and_every_download_can_use_a_mirror() {
    let instructions = dockerfile();
    for from in instructions.iter().filter(|(k, _)| k == "FROM") {
        let image = dockerfile_image(&instructions, &from.1);
        assert!(pinned(&image), "the Dockerfile's FROM {image} is not an exact version");
        assert!(from.1.starts_with("${REGISTRY}/"), "FROM {} comes through the REGISTRY build argument", from.1);
    }
    let compose = &yaml_documents(&root().join("deploy/docker-compose.yml"))[0];
    for (name, svc) in compose["services"].as_object().unwrap() {
        if svc.get("build").is_none() {
            let image = str_of(&svc["image"]);
            assert!(pinned(&image), "compose service {name} runs {image}, not an exact version");
        }
    }
    assert!(
        !pinned("rust:1-bookworm") && !pinned("redis:7") && !pinned("rabbitmq:3-management") && !pinned("x:latest")
    );

    // Each mirror is a build argument that is empty by default (the upstream) and used before
    // the download it is for; compose passes the same names through from the environment.
    let args: BTreeMap<&str, &str> =
        instructions.iter().filter(|(k, _)| k == "ARG").map(|(_, a)| a.split_once('=').unwrap_or((a, ""))).collect();
    assert_eq!(args.get("REGISTRY"), Some(&"docker.io"));
    let run_using = |arg: &str| {
        instructions
            .iter()
            .position(|(k, a)| k == "RUN" && a.contains(&format!("${arg}")))
            .unwrap_or_else(|| panic!("no RUN uses the build argument {arg}"))
    };
    let first_run = |needle: &str| {
        instructions.iter().position(|(k, a)| k == "RUN" && a.contains(needle)).unwrap_or_else(|| panic!("no {needle}"))
    };
    for (arg, before) in [("CRATES_MIRROR", "cargo build"), ("DEBIAN_MIRROR", "apt-get update")] {
        assert_eq!(args.get(arg), Some(&""), "{arg} defaults to no mirror");
        assert!(run_using(arg) <= first_run(before), "{arg} is set up before `{before}`");
    }
    assert!(instructions[run_using("CRATES_MIRROR")].1.contains("replace-with"), "cargo's source replacement");
    for (name, svc) in compose["services"].as_object().unwrap() {
        for arg in svc["build"]["args"].as_array().into_iter().flatten().map(str_of) {
            let arg = arg.split('=').next().unwrap().to_owned();
            assert!(args.contains_key(arg.as_str()), "compose service {name} passes {arg}, not a Dockerfile ARG");
        }
    }
}

#[test]
fn the_compose_services_are_the_ones_the_tests_expect() {
    // The suite's defaults (harness/services.rs), which scripts/services up starts compose for.
    use crate::harness::services;
    let compose = &yaml_documents(&root().join("deploy/docker-compose.yml"))[0];
    let services = compose["services"].as_object().unwrap();
    let tests_amqp = url::Url::parse(services::DEFAULT_AMQP_URL).unwrap();
    let tests_redis = url::Url::parse(services::DEFAULT_REDIS_URL).unwrap();

    let rabbitmq_env = string_map(&services["rabbitmq"]["environment"]);
    let user = rabbitmq_env.get("RABBITMQ_DEFAULT_USER").map_or("guest", String::as_str);
    let password = rabbitmq_env.get("RABBITMQ_DEFAULT_PASS").map_or("guest", String::as_str);
    assert_eq!((user, password), (tests_amqp.username(), tests_amqp.password().unwrap()), "the tests' credentials");
    let worker_amqp = url::Url::parse(&string_map(&services["worker"]["environment"])["WXPUSH_AMQP_URL"]).unwrap();
    assert_eq!((worker_amqp.username(), worker_amqp.password()), (user, Some(password)), "the programs' credentials");

    for (service, url) in [("rabbitmq", &tests_amqp), ("redis", &tests_redis)] {
        let published: Vec<String> = services[service]["ports"].as_array().unwrap().iter().map(str_of).collect();
        let wanted = format!("{}:{}:", url.host_str().unwrap(), url.port().unwrap());
        assert!(
            published.iter().any(|p| p.starts_with(&wanted)),
            "{service} is published where the tests look ({wanted}…), and on loopback only: {published:?}"
        );
        assert!(published.iter().all(|p| p.starts_with("127.0.0.1:")), "{service}: loopback only: {published:?}");
    }
}

#[test]
fn workers_spread_over_zones_and_nodes() {
    let docs = k8s_documents();
    let worker = deployment_running(&docs, "wxpush-worker");
    let (pod, _) = containers(worker);
    let labels = &worker["spec"]["template"]["metadata"]["labels"];
    let constraints = pod["topologySpreadConstraints"].as_array().expect("topologySpreadConstraints");
    let mut keys = BTreeSet::new();
    for c in constraints {
        assert!(labels_match(&c["labelSelector"]["matchLabels"], labels), "a constraint counts the workers: {c}");
        assert!(c["maxSkew"].as_u64().is_some_and(|n| n >= 1));
        let when = str_of(&c["whenUnsatisfiable"]);
        assert!(["ScheduleAnyway", "DoNotSchedule"].contains(&when.as_str()), "{when}");
        keys.insert(str_of(&c["topologyKey"]));
    }
    for key in ["topology.kubernetes.io/zone", "kubernetes.io/hostname"] {
        assert!(keys.contains(key), "workers spread over {key}: {keys:?}");
    }
}

#[test]
fn prometheus_operator_scrapes_the_worker_and_webhook_metrics_ports() {
    let docs = k8s_documents();
    let monitors = of_kind(&docs, "PodMonitor");
    let read = variables_read();
    let mut monitored = BTreeSet::new();
    for monitor in &monitors {
        let name = str_of(&monitor["metadata"]["name"]);
        let selected: Vec<_> = of_kind(&docs, "Deployment")
            .into_iter()
            .filter(|d| {
                labels_match(&monitor["spec"]["selector"]["matchLabels"], &d["spec"]["template"]["metadata"]["labels"])
            })
            .collect();
        assert_eq!(selected.len(), 1, "PodMonitor {name} selects one Deployment's pods");
        let (pod, containers) = containers(selected[0]);
        let c = containers[0];
        let program = program(c);
        let env = container_env(&docs, c);
        let config = effective_config(&name, &mounted_config_file(&docs, pod, c, &env), &env);
        // Where the program serves /metrics: the worker on WXPUSH_METRICS_LISTEN, the webhook on
        // its admin port (WXPUSH_WEBHOOK_ADMIN_LISTEN, 9101), once the code has that port.
        let metrics_port = match program.as_str() {
            "wxpush-worker" => Some(config.metrics_listen.port()),
            "wxpush-webhook" if read.contains("WXPUSH_WEBHOOK_ADMIN_LISTEN") => Some(
                env.get("WXPUSH_WEBHOOK_ADMIN_LISTEN")
                    .map_or(9101, |a| a.parse::<std::net::SocketAddr>().expect("an address").port()),
            ),
            "wxpush-webhook" => None,
            other => panic!("PodMonitor {name} scrapes {other}, which serves no metrics"),
        };
        let endpoints = monitor["spec"]["podMetricsEndpoints"].as_array().expect("podMetricsEndpoints");
        assert!(!endpoints.is_empty());
        for e in endpoints {
            assert_eq!(e["path"], "/metrics", "{name}");
            let port_name = e["port"].as_str().expect("a named port");
            let port = c["ports"].as_array().into_iter().flatten().find(|p| p["name"] == port_name);
            if let Some(wanted) = metrics_port {
                let port = port.unwrap_or_else(|| panic!("PodMonitor {name}: {program} has no port named {port_name}"));
                assert_eq!(port["containerPort"].as_u64(), Some(u64::from(wanted)), "{name}: the metrics port");
            }
        }
        monitored.insert(program);
    }
    assert_eq!(monitored, BTreeSet::from(["wxpush-webhook".to_owned(), "wxpush-worker".to_owned()]));
}

#[test]
fn the_ingress_serves_only_the_push_urls_over_tls() {
    let docs = k8s_documents();
    let ingress = named(&docs, "Ingress", "wxpush-webhook");
    let tls_hosts: BTreeSet<String> = ingress["spec"]["tls"]
        .as_array()
        .expect("tls")
        .iter()
        .flat_map(|t| t["hosts"].as_array().unwrap())
        .map(str_of)
        .collect();
    assert!(ingress["spec"]["tls"].as_array().unwrap().iter().all(|t| t["secretName"].is_string()), "a certificate");
    let webhook = deployment_running(&docs, "wxpush-webhook");
    let (pod, containers) = containers(webhook);
    let env = container_env(&docs, containers[0]);
    let config = effective_config("webhook", &mounted_config_file(&docs, pod, containers[0], &env), &env);
    for rule in ingress["spec"]["rules"].as_array().expect("rules") {
        let host = str_of(&rule["host"]);
        assert!(tls_hosts.contains(&host), "{host} is served over TLS");
        for path in rule["http"]["paths"].as_array().unwrap() {
            assert!(str_of(&path["path"]).starts_with("/wechat"), "only the push URLs are exposed: {path}");
            let backend = &path["backend"]["service"];
            let service = named(&docs, "Service", backend["name"].as_str().unwrap());
            assert!(
                labels_match(&service["spec"]["selector"], &webhook["spec"]["template"]["metadata"]["labels"]),
                "the Ingress reaches the webhook's pods"
            );
            let port = service["spec"]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == backend["port"]["name"] || p["port"] == backend["port"]["number"])
                .expect("the backend port is a port of the Service");
            let target = &port["targetPort"];
            let container_port = containers[0]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == *target || p["containerPort"] == *target)
                .expect("the Service's target is a container port");
            assert_eq!(container_port["containerPort"].as_u64(), Some(u64::from(config.webhook_listen.port())));
        }
    }
}

/// Dockerfile instructions as (KEYWORD, arguments), continuation lines joined, comments dropped.
fn dockerfile() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut current = String::new();
    for line in read("deploy/Dockerfile").lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, args) = current.split_once(char::is_whitespace).unwrap_or((&current, ""));
        out.push((keyword.to_ascii_uppercase(), args.trim().to_owned()));
        current.clear();
    }
    out
}

#[test]
fn the_dockerfile_builds_and_ships_every_program() {
    let instructions = dockerfile();
    let all = |kw: &'static str| instructions.iter().filter(move |(k, _)| k == kw).map(|(_, a)| a.as_str());
    let froms: Vec<String> = all("FROM").map(|f| dockerfile_image(&instructions, f)).collect();
    assert_eq!(froms.len(), 2, "a build stage and a runtime stage");
    let (builder, runtime) = (&froms[0], &froms[1]);
    assert!(
        builder.starts_with("rust:") && builder.contains("bookworm") && builder.ends_with(" AS builder"),
        "{builder}"
    );
    assert!(
        runtime.starts_with("debian:12.") || runtime.starts_with("debian:bookworm-"),
        "a runtime with the same glibc (Debian 12, bookworm) as the builder: {runtime}"
    );
    let runs: Vec<&str> = all("RUN").collect();
    assert!(runs.iter().any(|r| r.contains("cargo build --release --locked")), "a locked release build");

    // The dependency layer builds Cargo.toml before the sources are there: it needs a stand-in
    // for the default binary and for every target Cargo.toml declares by path.
    let manifest = cargo_toml();
    let mut stand_ins: Vec<String> = Vec::new();
    if let Some(run) = manifest["package"].get("default-run").and_then(|v| v.as_str()) {
        stand_ins.push(format!("src/bin/{run}.rs"));
    }
    for (kind, dir) in [("bench", "benches"), ("test", "tests"), ("example", "examples")] {
        for target in manifest.get(kind).and_then(|t| t.as_array()).into_iter().flatten() {
            let path = target.get("path").and_then(|p| p.as_str()).map(str::to_owned);
            stand_ins.push(path.unwrap_or_else(|| format!("{dir}/{}.rs", target["name"].as_str().unwrap())));
        }
    }
    let dependency_layer = runs.iter().find(|r| r.contains("cargo build")).expect("a RUN that builds");
    for path in &stand_ins {
        assert!(dependency_layer.contains(&format!("> {path}")), "the dependency layer needs a stand-in {path}");
    }

    let shipped = shipped_binaries();
    let built: BTreeSet<String> = runs
        .iter()
        .flat_map(|r| {
            r.split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .filter(|w| w[0] == "--bin")
                .map(|w| w[1].to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(built, shipped, "the image builds every program");
    let copied: BTreeSet<String> = all("COPY")
        .filter(|a| a.starts_with("--from=builder"))
        .flat_map(|a| {
            a.split_whitespace()
                .filter_map(|w| w.split_once("/target/release/"))
                .map(|(_, b)| b.to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(copied, shipped, "the image ships every program (src/bin and [[bin]] targets)");
    assert!(all("COPY").any(|a| a.starts_with("config/default.toml ")), "the reference configuration");

    let user = all("USER").next_back().expect("a USER");
    let uid: u32 = user.split(':').next().unwrap().parse().expect("a numeric UID, for runAsNonRoot");
    assert!(uid > 0, "not root");
    let exposed: BTreeSet<u16> = all("EXPOSE").flat_map(|a| a.split_whitespace()).map(|p| p.parse().unwrap()).collect();
    assert_eq!(exposed, BTreeSet::from([8080, 9100, 9101, 9300]));
    let cmd: Vec<String> = serde_json::from_str(all("CMD").next_back().expect("a CMD")).expect("CMD in exec form");
    assert_eq!(cmd, ["wxpush-worker"], "the worker by default");
    let env_vars: Vec<String> = all("ENV").map(|a| a.split(['=', ' ']).next().unwrap().to_owned()).collect();
    assert_known_variables("the Dockerfile", env_vars.iter(), &variables_read());

    let ignored = read(".dockerignore");
    assert!(ignored.lines().any(|l| l.trim_end_matches('/') == "target"), ".dockerignore leaves out target/");
}

/// Every PromQL expression of the dashboard: panel targets and template-variable queries.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    fn panels(list: &Value, out: &mut Vec<String>) {
        for panel in list.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                out.push(str_of(&target["expr"]));
            }
            panels(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for var in dashboard["templating"]["list"].as_array().into_iter().flatten().filter(|v| v["type"] == "query") {
        out.push(var["query"]["query"].as_str().or(var["query"].as_str()).expect("a query").to_owned());
    }
    out
}

/// `wxpush_…` metric names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in expr.match_indices("wxpush_") {
        if i > 0 && expr[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &expr[i..];
        let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
        out.push(rest[..end].to_owned());
    }
    out
}

fn dashboard() -> Value {
    serde_json::from_str(&read("deploy/grafana/wxpush-dashboard.json")).expect("the dashboard is JSON")
}

#[test]
fn the_dashboard_shows_every_metric_the_code_emits_and_no_other() {
    let dashboard = dashboard();
    let emitted = emitted_metrics();
    assert!(emitted.contains_key("wxpush_jobs_total"), "the scan finds the metrics: {emitted:?}");
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 10);
    let mut shown = BTreeSet::new();
    for expr in &queries {
        for name in metric_names(expr) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| emitted.get(*b) == Some(&MetricKind::Histogram) && !emitted.contains_key(name.as_str()));
            let metric = base.unwrap_or(&name);
            assert!(emitted.contains_key(metric), "the dashboard queries {name}, which the code does not emit: {expr}");
            if expr.contains("histogram_quantile") && name.ends_with("_bucket") {
                assert_eq!(emitted[metric], MetricKind::Histogram, "{expr}");
            }
            shown.insert(metric.to_owned());
        }
    }
    let missing: Vec<_> = emitted.keys().filter(|m| !shown.contains(*m)).collect();
    assert!(missing.is_empty(), "metrics the dashboard does not show: {missing:?}");

    // Panels read the data source the user picks at import.
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    assert!(vars.iter().any(|v| v["type"] == "datasource" && v["name"] == "datasource"));
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "panel ids are unique");
        if panel["type"] != "row" {
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{}", panel["title"]);
        }
    }
}

#[test]
fn histograms_the_dashboard_takes_quantiles_of_render_buckets() {
    // The worker's recorder is the process' global one: it gets a test process of its own.
    const TEST: &str = "deploy::histograms_the_dashboard_takes_quantiles_of_render_buckets";
    if !is_alone(TEST) {
        let out = run_alone(TEST, &[]);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("1 passed"), "{TEST} in a process of its own:\n{text}");
        return;
    }
    // Without configured buckets the exporter renders a summary, and histogram_quantile over
    // `_bucket` finds nothing: render them the way the programs do.
    // Every program installs the same recorder, the webhook's histograms' buckets included.
    let handle = install_metrics().expect("the first recorder of this test process");
    let mut checked = 0;
    for expr in dashboard_queries(&dashboard()).iter().filter(|e| e.contains("histogram_quantile")) {
        for name in metric_names(expr) {
            let base = name.strip_suffix("_bucket").unwrap_or_else(|| panic!("quantile of a non-bucket: {expr}"));
            let label = if base.starts_with("wxpush_webhook_") { "outcome" } else { "account" };
            metrics::histogram!(base.to_owned(), label => "deploy-test").record(0.2);
            let text = handle.render();
            assert!(text.contains(&format!("{base}_bucket{{")), "{base} renders no buckets:\n{text}");
            checked += 1;
        }
    }
    assert!(checked > 0, "the dashboard shows send latency quantiles");
}

#[test]
fn the_scans_find_what_they_look_for() {
    // The checks above are only as good as these scans.
    let read = variables_read();
    for var in ["WXPUSH_AMQP_URL", "WXPUSH_CONFIG", "WXPUSH_LOG_FORMAT", "WXPUSH_SANDBOX_LISTEN"] {
        assert!(read.contains(var), "{var} in {read:?}");
    }
    assert!(bin_targets().contains("wxpush-worker"));
    assert_eq!(
        metric_names("rate(wxpush_a_total[1m]) / x_wxpush_b + wxpush_c_bucket"),
        ["wxpush_a_total", "wxpush_c_bucket"]
    );
    assert_eq!(compose_duration_secs("1m30s"), 90.0);
    assert_eq!(compose_duration_secs("500ms"), 0.5);
}
