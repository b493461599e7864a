//! Placement lookups: the registry's subscribe placement over a cluster of 1,000 nodes in 10
//! regions, and a node's load report (what 1,000 nodes reporting at 1 Hz cost).

use std::hint::black_box;
use std::time::Instant;

use castnode::manager::registry::Registry;
use castnode::manager::{BroadcastLoad, Hint, LoadReport, NodeAddresses, NodeInfo, NodeRole};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn cluster(nodes: usize) -> Registry {
    let now = Instant::now();
    let mut r = Registry::new(std::time::Duration::from_secs(3600), "r0");
    for i in 0..nodes {
        let role = if i % 10 == 0 {
            NodeRole::Origin
        } else {
            NodeRole::Edge
        };
        r.register(
            NodeInfo {
                id: format!("node-{i}"),
                role,
                region: format!("r{}", i % 10),
                addresses: NodeAddresses {
                    rtmp: Some(format!("rtmp://10.0.{}.{}:1935", i / 250, i % 250)),
                    http: format!("http://10.0.{}.{}:8080", i / 250, i % 250),
                    cluster: Some(format!("10.0.{}.{}:4443", i / 250, i % 250)),
                },
                capacity: u64::MAX / 2,
                group: None,
            },
            now,
        );
        let broadcasts = (0..20)
            .map(|b| BroadcastLoad {
                name: format!("live/{}", (i + b) % 200),
                viewers: 10,
                node_subscriptions: 0,
                ladder_from: None,
                publishing: role == NodeRole::Origin,
            })
            .collect();
        let load = LoadReport {
            viewers: (i as u64 * 7) % 500,
            broadcasts,
            ..LoadReport::default()
        };
        r.report(&format!("node-{i}"), load, now).unwrap();
    }
    r
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("placement");
    g.throughput(Throughput::Elements(1));
    let mut reg = cluster(1000);
    let hint = Hint {
        region: Some("r3".into()),
        client: None,
    };
    let mut n = 0usize;
    g.bench_function("subscribe_1000_nodes", |b| {
        b.iter(|| {
            n += 1;
            let p = reg.place_subscribe("live/17", &hint, &mut |k| n % k, Instant::now());
            black_box(p.is_ok())
        })
    });
    let mut reg = cluster(1000);
    let report = LoadReport {
        viewers: 42,
        broadcasts: (0..20)
            .map(|b| BroadcastLoad {
                name: format!("live/{b}"),
                viewers: 3,
                node_subscriptions: 0,
                ladder_from: None,
                publishing: false,
            })
            .collect(),
        ..LoadReport::default()
    };
    g.bench_function("report_1000_nodes", |b| {
        b.iter(|| {
            n = (n + 1) % 1000;
            let id = format!("node-{n}");
            black_box(reg.report(&id, report.clone(), Instant::now()).is_ok())
        })
    });
    // What the manager's API does with a report's body before the registry sees it.
    let body = serde_json::to_vec(&report).unwrap();
    g.bench_function("report_json_parse", |b| {
        b.iter(|| black_box(serde_json::from_slice::<LoadReport>(black_box(&body)).is_ok()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
