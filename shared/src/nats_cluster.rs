//! Configurations of a local JetStream cluster, generated from the production
//! example `nats/cluster/n1.conf`.
//!
//! The test harness, `comfyq-loadtest --cluster N` and `comfyq up --cluster N`
//! all start their nodes from these files, so the example stays what actually
//! runs: only the node's name, ports, store directory and routes change
//! (and, on request, `sync_interval`).

use std::fmt::Write as _;
use std::path::PathBuf;

/// `nats/cluster/n1.conf`, the template of every generated node.
pub const NODE_TEMPLATE: &str = include_str!("../../nats/cluster/n1.conf");

/// One node of a local cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    pub server_name: String,
    pub client_port: u16,
    pub http_port: u16,
    pub cluster_port: u16,
    /// Cluster ports of the other nodes (all on 127.0.0.1).
    pub route_ports: Vec<u16>,
    pub store_dir: PathBuf,
    /// Flush every write to disk before acknowledging it (`sync_interval:
    /// always`): an acknowledged message survives all nodes crashing at once.
    pub sync_always: bool,
}

/// The specs of an `n`-node cluster whose nodes listen on the given ports
/// (`ports[i]` = (client, http, cluster)) and store under `store_root/<name>`.
pub fn local_cluster(
    name_prefix: &str,
    ports: &[(u16, u16, u16)],
    store_root: &std::path::Path,
    sync_always: bool,
) -> Vec<NodeSpec> {
    ports
        .iter()
        .enumerate()
        .map(|(index, &(client_port, http_port, cluster_port))| {
            let server_name = format!("{name_prefix}{}", index + 1);
            NodeSpec {
                store_dir: store_root.join(&server_name),
                server_name,
                client_port,
                http_port,
                cluster_port,
                route_ports: ports
                    .iter()
                    .enumerate()
                    .filter(|&(other, _)| other != index)
                    .map(|(_, &(_, _, cluster))| cluster)
                    .collect(),
                sync_always,
            }
        })
        .collect()
}

/// The client URLs of `nodes`, comma separated (what `nats.url` takes).
pub fn client_urls(nodes: &[NodeSpec]) -> String {
    nodes
        .iter()
        .map(|node| format!("nats://127.0.0.1:{}", node.client_port))
        .collect::<Vec<_>>()
        .join(",")
}

/// Renders `spec` from [`NODE_TEMPLATE`].
pub fn render(spec: &NodeSpec) -> String {
    render_from(NODE_TEMPLATE, spec)
}

/// Renders `spec` from `template` (a node config laid out as
/// `nats/cluster/n1.conf`): top-level `server_name`, `port`, `http_port`;
/// `store_dir` in `jetstream {}`; `port` and a `routes: [ … ]` list in
/// `cluster {}`. Comments and every other setting are kept.
pub fn render_from(template: &str, spec: &NodeSpec) -> String {
    let mut out = String::with_capacity(template.len() + 256);
    let mut block: Vec<String> = Vec::new();
    let mut in_routes = false;
    for line in template.lines() {
        let trimmed = line.trim();
        let indent = &line[..line.len() - line.trim_start().len()];
        if in_routes {
            if trimmed.starts_with(']') {
                in_routes = false;
                for port in &spec.route_ports {
                    let _ = writeln!(out, "{indent}  nats-route://127.0.0.1:{port}");
                }
                let _ = writeln!(out, "{line}");
            }
            continue;
        }
        let key = trimmed
            .split(|c: char| c == ':' || c.is_whitespace())
            .next()
            .unwrap_or("");
        let section = block.last().map(String::as_str);
        let replaced = match (section, key) {
            (None, "server_name") => Some(format!("server_name: {}", spec.server_name)),
            (None, "port") => Some(format!("port: {}", spec.client_port)),
            (None, "http_port") => Some(format!("http_port: {}", spec.http_port)),
            (Some("jetstream"), "store_dir") => {
                let mut text = format!("store_dir: {:?}", spec.store_dir.display().to_string());
                if spec.sync_always {
                    text.push_str(&format!("\n{indent}sync_interval: always"));
                }
                Some(text)
            }
            (Some("cluster"), "port") => Some(format!("port: {}", spec.cluster_port)),
            (Some("cluster"), "routes") => {
                in_routes = true;
                let _ = writeln!(out, "{line}");
                continue;
            }
            _ => None,
        };
        match replaced {
            Some(text) => {
                let _ = writeln!(out, "{indent}{text}");
            }
            None => {
                let _ = writeln!(out, "{line}");
            }
        }
        if let Some(name) = trimmed.strip_suffix('{') {
            block.push(name.trim().trim_end_matches(':').trim().to_owned());
        } else if trimmed.starts_with('}') {
            block.pop();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(text: &str) -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(str::to_owned)
            .collect()
    }

    fn example_node(index: u16) -> NodeSpec {
        let ports = [(4222, 8222, 6222), (4223, 8223, 6223), (4224, 8224, 6224)];
        let mut nodes = local_cluster(
            "n",
            &ports,
            std::path::Path::new("./.comfyq/nats-cluster"),
            false,
        );
        nodes.remove(usize::from(index))
    }

    /// The generator reproduces every example node from n1: the examples and
    /// what the harness runs cannot drift apart.
    #[test]
    fn rendering_the_examples_from_n1_gives_the_examples() {
        let examples = [
            include_str!("../../nats/cluster/n1.conf"),
            include_str!("../../nats/cluster/n2.conf"),
            include_str!("../../nats/cluster/n3.conf"),
        ];
        for (index, example) in examples.iter().enumerate() {
            let rendered = render(&example_node(index as u16));
            assert_eq!(settings(&rendered), settings(example), "node {}", index + 1);
        }
    }

    #[test]
    fn sync_always_is_added_to_the_jetstream_block() {
        let mut node = example_node(0);
        node.sync_always = true;
        let rendered = render(&node);
        let lines = settings(&rendered);
        let store = lines
            .iter()
            .position(|l| l.starts_with("store_dir"))
            .expect("store_dir");
        assert_eq!(lines[store + 1], "sync_interval: always");
    }

    #[test]
    fn urls_list_every_client_port() {
        let nodes = local_cluster(
            "c",
            &[(1, 2, 3), (4, 5, 6)],
            std::path::Path::new("/s"),
            false,
        );
        assert_eq!(client_urls(&nodes), "nats://127.0.0.1:1,nats://127.0.0.1:4");
        assert_eq!(nodes[0].route_ports, vec![6]);
        assert_eq!(nodes[1].store_dir, std::path::Path::new("/s/c2"));
    }
}
