//! Every library item the tests name, imported here and nowhere else: when the library moves or
//! renames one, this is the file to re-point. Grouped by the library's modules.

pub use wxpush::{
    acks::Acknowledger,
    amqp::{
        AmqpError, Broker, Brokers, Topology, dead_letter_queue_args, declare_dead_letter_queue, declare_queue,
        declare_results_exchange, declare_unrouted_queue, header_str, json_properties, unrouted_name,
    },
    config::{Account, Config, ENV_VARS, QueueType, TokenApi},
    ctl::{
        CtlError,
        check::{self, Level},
        dead::{self, ReplayOptions, Selection},
        demo::{self, DemoOptions},
        progress::{Recorder, Silent},
        publish::{self, PublishOptions},
        results::{self, ReceivedResult, ShowOptions, ShowSummary, Source},
        status::{self, QueueRole},
    },
    domain::{
        calendar::QuotaDay,
        crypto::{self, Cipher},
        errcode,
    },
    health::{self, Health, install_metrics},
    pipeline::{ATTEMPTS_HEADER, Disposition, REASON_HEADER, SOURCE_HEADER},
    sandbox::{
        Faults, ReceiptSettings, Sandbox, SandboxAccount, SandboxConfig, SentMessage, WebhookTarget, original_id,
    },
    store::{
        Keys, Redis, conn,
        ledger::Claim,
        limits::{Admission, Budget},
    },
    telemetry::catalog::describe_metrics,
    tls::{Tls, TlsSettings},
    webhook::{Listeners, Webhook, WebhookSettings, dedupe, metrics as webhook_metrics, serve_with},
    worker::run as run_worker,
};
