//! Every library item the tests name, imported here and nowhere else: when the library moves or
//! renames one, this is the file to re-point. Grouped by the library's modules.

pub use wxpush::{
    amqp::{
        AmqpError, Nodes, ReconnectingPublisher, Topology, dead_letter_queue_args, declare_dead_letter_queue,
        declare_results_exchange, declare_unrouted_queue, header_str,
        headers::{
            ATTEMPTS as ATTEMPTS_HEADER, REASON as REASON_HEADER, SOURCE_QUEUE as SOURCE_HEADER, text_of as header_text,
        },
        json_properties,
        topology::declare_queue,
        unrouted_name,
    },
    config::{Account, AccountKind, Config, ENV_VARS, QueueType, TokenApi},
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
        job::JobKind,
    },
    health::{self, Health},
    sandbox::{
        Consent, EventFormat, Faults, ReceiptSettings, Sandbox, SandboxAccount, SandboxConfig, SentMessage,
        WebhookTarget, original_id,
    },
    store::{
        Keys, Redis, conn,
        ledger::Claim,
        limits::{Admission, Budget, Pause},
    },
    telemetry::{catalog::describe_metrics, install_metrics},
    tls::{Tls, TlsSettings},
    webhook::{Listeners, Webhook, WebhookSettings, broker as webhook_broker, serve_with},
    worker::{Disposition, acks::Acknowledger, run as run_worker},
};
