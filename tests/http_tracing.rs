//! The ApiClient's tracing span, alone in its own test binary: tracing
//! caches per-callsite interest process-wide, so a thread-local subscriber
//! racing other tests' threads can miss the span.

mod common;

use std::sync::Arc;

use common::{fast_retry, within};
use smolkit::http::ApiClient;
use smolkit::testing::ChaosServer;

#[test]
fn api_call_span_carries_its_fields() {
    use std::sync::Mutex;
    use tracing_subscriber::layer::SubscriberExt;

    #[derive(Default, Clone)]
    struct Fields(Arc<Mutex<Vec<String>>>);
    struct Visitor<'a>(&'a mut Vec<String>);
    impl tracing::field::Visit for Visitor<'_> {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            self.0.push(format!("{}={:?}", field.name(), value));
        }
        fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
            self.0.push(format!("{}={}", field.name(), value));
        }
    }
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Fields {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            _: &tracing::span::Id,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            if attrs.metadata().name() == "http.call" {
                attrs.record(&mut Visitor(&mut self.0.lock().unwrap()));
            }
        }
        fn on_record(
            &self,
            _: &tracing::span::Id,
            values: &tracing::span::Record<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            values.record(&mut Visitor(&mut self.0.lock().unwrap()));
        }
    }

    let fields = Fields::default();
    let subscriber = tracing_subscriber::registry().with(fields.clone());
    within(move || {
        tracing::subscriber::with_default(subscriber, || {
            smol::block_on(async {
                let server = ChaosServer::start().await.unwrap();
                let api = ApiClient::builder(&server.url("/"))
                    .with_retry(fast_retry(3))
                    .build()
                    .unwrap();
                api.get("flaky/t?fail=1").send().await.unwrap();
            })
        })
    });
    let seen = fields.0.lock().unwrap().join(" ");
    for want in [
        "method=GET",
        "endpoint=flaky/t?fail=1",
        "status=200",
        "attempts=2",
        "duration_ms=",
    ] {
        assert!(seen.contains(want), "missing {want} in {seen}");
    }
}
