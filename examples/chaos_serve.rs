//! Serves a ChaosServer until killed, printing its URL (for poking it with
//! outside tools: curl, `big_client`).
//! `--runtime smol` (default) runs it on smol's global executor,
//! `--runtime smolkit` on a one-thread smolkit `Runtime`.
//!
//! Run: `cargo run --release --features testing --example chaos_serve`
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let smolkit_rt = std::env::args().any(|a| a == "smolkit");
    let rt = smolkit::runtime::Runtime::builder()
        .with_threads(1)
        .build()?;
    let server = if smolkit_rt {
        rt.block_on(
            smolkit::testing::ChaosServer::builder()
                .with_spawner(rt.spawner())
                .start(),
        )?
    } else {
        smol::block_on(smolkit::testing::ChaosServer::start())?
    };
    println!("{}", server.url("/"));
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
