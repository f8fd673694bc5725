//! The soak's load: a flash sale, a checkout and browsing at once, open loop, each at a
//! steady rate and sized to last the whole soak.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::cli::{BrowseArgs, CheckoutArgs, Common, EventsSeenBy, FlashSaleArgs, SoakArgs};
use crate::histogram::LatencyTap;

/// The recorders' labels that each stand for one request of the load: a coupon request of
/// the sale (`answer (all)`; the other `answer …` labels split the same requests by
/// outcome), a read of the browsing, and the checkout's commands. Not the checkout's whole
/// journey (a sum of these) nor its `GET /requests/{id}?wait` (a long poll, slow by design).
pub const REQUEST_LABELS: &[&str] = &[
    "answer (all)",
    "all",
    "POST /orders",
    "POST /orders/{id}/payment",
    "POST /users/{id}/balance/charge",
];

/// How long a patient client keeps sending a request again. A steady load on a healthy
/// system needs none; a shared machine can make an answer late now and then, and the soak
/// is about growth, not about a single late answer (which the latency series still shows).
const CLIENT_PATIENCE: Duration = Duration::from_secs(30);

/// The three loads, told apart by the notifier each rings when its measured load starts.
pub struct Loads {
    pub flash: FlashSaleArgs,
    pub checkout: CheckoutArgs,
    pub browse: BrowseArgs,
    pub started: [Arc<Notify>; 3],
}

/// `api`: the replicas' URLs; `database_url`: the soak's database, as the load generator
/// connects to it (with its own `application_name`, so that its connections are not
/// counted as the system's).
pub fn loads(args: &SoakArgs, api: &str, database_url: &str, out_dir: &Path, tap: &Arc<LatencyTap>) -> Loads {
    let started: [Arc<Notify>; 3] = Default::default();
    let common = |rate: f64, out: &str, started: &Arc<Notify>| Common {
        api: api.to_owned(),
        commands_url: None,
        database_url: database_url.to_owned(),
        admin_token: args.admin_token.clone(),
        // At most this many in flight: far above what the rates need, so that a slow
        // moment shows as latency rather than as requests not sent.
        concurrency: 100,
        rate: Some(rate),
        seed: 1,
        request_timeout_secs: 30,
        warmup: 0,
        drain_timeout_secs: 180,
        api_metrics: None,
        worker_metrics: Vec::new(),
        processes: Vec::new(),
        label: String::new(),
        out: Some(out_dir.join(out)),
        statistics_delay_secs: 0,
        patience_secs: CLIENT_PATIENCE.as_secs(),
        load_started: Some(Arc::clone(started)),
        unavailable: None,
        latency_tap: Some(Arc::clone(tap)),
    };
    let seconds = args.duration().as_secs_f64();
    // A flash sale sends about 1.15 requests a user (retries and second attempts). Coupons
    // for nine users in ten: the sale sells all along and sells out near the end.
    let flash_users = ((args.flash_rate * seconds / 1.15) as usize).max(10);
    let flash = FlashSaleArgs {
        common: common(args.flash_rate, "flash-sale.json", &started[0]),
        users: flash_users,
        quantity: i64::try_from(flash_users * 9 / 10).unwrap_or(1).max(1),
        retry_share: 0.10,
        second_attempt_share: 0.05,
    };
    let checkout = CheckoutArgs {
        common: common(args.checkout_rate, "checkout.json", &started[1]),
        users: ((args.checkout_rate * seconds) as usize).max(1),
        products: 20,
        coupon_share: 0.2,
        charge_share: 0.5,
        // The soak runs the data-platform stand-in, as production does.
        events_seen_by: EventsSeenBy::DataPlatform,
        amqp_url: String::new(),
        amqp_prefix: String::new(),
    };
    let browse = BrowseArgs {
        common: common(args.browse_rate, "browse.json", &started[2]),
        users: 1_000,
        products: 100,
        duration_secs: args.duration().as_secs().max(1),
    };
    Loads {
        flash,
        checkout,
        browse,
        started,
    }
}

/// Requests per second the three loads send, about: the sale's rate, the checkout's
/// journeys at about three requests each (a charge for half of them, the order, the
/// payment), and the reads.
pub fn requests_per_sec(args: &SoakArgs) -> f64 {
    args.flash_rate + 2.5 * args.checkout_rate + args.browse_rate
}
