//! The control plane: credentials, etcd, kube-apiserver, kube-controller-manager, the Node objects, and the
//! relay that lets the root namespace reach the apiserver.
//!
//! Everything runs inside `orca-cp`: etcd on 127.0.0.1:2379, the apiserver on `<cp IP>:6443`, the
//! controller-manager talking to the apiserver over the fabric. Credentials are generated at every start (rcgen):
//! a CA, the apiserver's serving certificate (SANs: cp IP, the `kubernetes` Service IP, 127.0.0.1 and the
//! in-cluster DNS names), a service-account key pair, and client certificates for the admin (group
//! `system:masters`), the controller-manager (`system:kube-controller-manager`) and kube-proxy
//! (`system:kube-proxy`, bound to `system:node-proxier` by the default RBAC policy).
//!
//! # Reaching the apiserver
//!
//! The root namespace has no route to the fabric, on purpose. Processes in node namespaces (kube-proxy,
//! orca-proxy) use [`Sandbox::fabric_kubeconfig`] / [`Sandbox::kube_proxy_kubeconfig`], which point at
//! `https://<cp IP>:6443`. Code in the root namespace (tests, `kubectl` while `cargo xtask sandbox up` runs) uses
//! [`Sandbox::kubeconfig`], which points at `https://127.0.0.1:<port>`: an in-process relay accepts there and, for
//! each connection, has a dedicated thread that entered `orca-cp` with setns(2) open the TCP connection to the
//! apiserver; the two sockets are then spliced by a tokio task. TLS is end to end (the serving cert carries
//! 127.0.0.1). The relay lives as long as the [`Sandbox`] (and the tokio runtime it was created on).
use crate::build;
use crate::netns::{self, SandboxLock};
use crate::topology::Topology;
use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use serde_json::json;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Once};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Port of the apiserver on the control-plane IP.
pub const APISERVER_PORT: u16 = 6443;
/// etcd's client port on 127.0.0.1 inside the control-plane namespace.
pub const ETCD_CLIENT_PORT: u16 = 2379;

/// Controllers kube-controller-manager runs. No node-lifecycle controller: Node objects stay as registered.
pub const CONTROLLERS: &[&str] = &[
    "endpoints-controller",
    "endpointslice-controller",
    "endpointslice-mirroring-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "namespace-controller",
    "garbage-collector-controller",
    "root-ca-certificate-publisher-controller",
    "service-cidr-controller",
];

/// How to bring the sandbox up.
#[derive(Clone, Debug)]
pub struct SandboxOptions {
    pub topology: Topology,
    /// Directory with etcd, kube-apiserver, kube-controller-manager (and kube-proxy); `None`: build or reuse the
    /// cached ones ([`build::ensure_k8s_binaries`]).
    pub bin_dir: Option<PathBuf>,
    /// Limit for each start-up step (etcd, apiserver /readyz, controller-manager).
    pub start_timeout: Duration,
    /// How long to wait for another sandbox on this machine to finish.
    pub lock_timeout: Duration,
    /// klog verbosity (`--v`) of the apiserver and controller-manager.
    pub verbosity: u8,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            topology: Topology::default(),
            bin_dir: None,
            start_timeout: Duration::from_secs(120),
            lock_timeout: Duration::from_secs(600),
            verbosity: 2,
        }
    }
}

/// Set while a sandbox is up in this process, so the Ctrl-C/SIGTERM handler knows to tear down.
static ACTIVE: AtomicBool = AtomicBool::new(false);
static HANDLER: Once = Once::new();

fn install_signal_handler() {
    HANDLER.call_once(|| {
        // `set_handler` (not `try_`): a shell starts background jobs with SIGINT ignored, and an ignored
        // SIGINT must not keep us from tearing down on SIGTERM/SIGHUP.
        let r = ctrlc::set_handler(|| {
            if ACTIVE.swap(false, Ordering::SeqCst) {
                eprintln!("[orca-sandbox] interrupted: tearing the sandbox down");
                let removed = netns::teardown();
                eprintln!("[orca-sandbox] removed {} items", removed.len());
            }
            std::process::exit(130);
        });
        if let Err(e) = r {
            eprintln!(
                "[orca-sandbox] could not install the Ctrl-C handler ({e}); an interrupted run leaves the sandbox \
                 for the next `up` or `cargo xtask sandbox down`"
            );
        }
    });
}

/// Files of one run, under `.cache/sandbox/run/`.
#[derive(Clone, Debug)]
pub struct RunFiles {
    pub dir: PathBuf,
}

impl RunFiles {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.path("ca.crt")
    }
    /// Admin kubeconfig for the root namespace (through the relay).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.path("admin.kubeconfig")
    }
    /// Admin kubeconfig for processes inside the sandbox's namespaces (cp IP directly).
    pub fn fabric_kubeconfig(&self) -> PathBuf {
        self.path("admin-fabric.kubeconfig")
    }
    /// kube-proxy's identity (`system:kube-proxy`), for processes in node namespaces.
    pub fn kube_proxy_kubeconfig(&self) -> PathBuf {
        self.path("kube-proxy.kubeconfig")
    }
    fn controller_manager_kubeconfig(&self) -> PathBuf {
        self.path("controller-manager.kubeconfig")
    }
}

struct Pki {
    ca: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(files: &RunFiles) -> Result<Pki> {
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, "orca-sandbox-ca");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        write_secret(&files.ca_cert(), cert.pem().as_bytes())?;
        write_secret(&files.path("ca.key"), key.serialize_pem().as_bytes())?;
        Ok(Pki {
            ca: Issuer::new(params, key),
        })
    }

    /// Issue `<name>.crt` / `<name>.key` signed by the CA.
    fn issue(
        &self,
        files: &RunFiles,
        name: &str,
        common_name: &str,
        orgs: &[&str],
        sans: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<()> {
        let key = KeyPair::generate().with_context(|| format!("generating the {name} key"))?;
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        for o in orgs {
            params.distinguished_name.push(DnType::OrganizationName, *o);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![usage];
        let cert = params
            .signed_by(&key, &self.ca)
            .with_context(|| format!("signing the {name} certificate"))?;
        write_secret(&files.path(&format!("{name}.crt")), cert.pem().as_bytes())?;
        write_secret(&files.path(&format!("{name}.key")), key.serialize_pem().as_bytes())?;
        Ok(())
    }
}

fn write_secret(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

fn kubeconfig_text(files: &RunFiles, server: &str, user: &str) -> String {
    let d = files.dir.display();
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: orca-sandbox\n  cluster:\n    server: {server}\n    \
         certificate-authority: {d}/ca.crt\nusers:\n- name: {user}\n  user:\n    client-certificate: {d}/{user}.crt\n    \
         client-key: {d}/{user}.key\ncontexts:\n- name: orca-sandbox\n  context:\n    cluster: orca-sandbox\n    \
         user: {user}\ncurrent-context: orca-sandbox\n"
    )
}

/// Generate every credential and kubeconfig of a run into `files.dir`.
fn generate_credentials(files: &RunFiles, topo: &Topology, relay_port: u16) -> Result<()> {
    let pki = Pki::new(files)?;
    let cp = topo.control_plane.ip.to_string();
    let mut sans = vec![
        cp.clone(),
        topo.kubernetes_service_ip().to_string(),
        "127.0.0.1".to_string(),
        "localhost".to_string(),
    ];
    for n in [
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ] {
        sans.push(n.to_string());
    }
    pki.issue(
        files,
        "apiserver",
        "kube-apiserver",
        &[],
        sans,
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let client = ExtendedKeyUsagePurpose::ClientAuth;
    pki.issue(
        files,
        "admin",
        "orca-admin",
        &["system:masters"],
        vec![],
        client.clone(),
    )?;
    pki.issue(
        files,
        "controller-manager",
        "system:kube-controller-manager",
        &[],
        vec![],
        client.clone(),
    )?;
    pki.issue(files, "kube-proxy", "system:kube-proxy", &[], vec![], client)?;
    let sa = KeyPair::generate().context("generating the service-account key")?;
    write_secret(&files.path("sa.key"), sa.serialize_pem().as_bytes())?;
    write_secret(&files.path("sa.pub"), sa.public_key_pem().as_bytes())?;

    let fabric = format!("https://{cp}:{APISERVER_PORT}");
    let local = format!("https://127.0.0.1:{relay_port}");
    for (path, server, user) in [
        (files.admin_kubeconfig(), &local, "admin"),
        (files.fabric_kubeconfig(), &fabric, "admin"),
        (files.kube_proxy_kubeconfig(), &fabric, "kube-proxy"),
        (files.controller_manager_kubeconfig(), &fabric, "controller-manager"),
    ] {
        write_secret(&path, kubeconfig_text(files, server, user).as_bytes())?;
    }
    Ok(())
}

type ConnectRequest = (SocketAddr, oneshot::Sender<std::io::Result<std::net::TcpStream>>);

/// Opens TCP connections from inside a namespace: a thread that entered the namespace with setns(2).
#[derive(Clone)]
pub struct NetnsConnector {
    tx: mpsc::Sender<ConnectRequest>,
}

impl NetnsConnector {
    /// Start the connector thread for namespace `ns` (it ends when every clone of the connector is dropped).
    pub fn new(ns: &str) -> Result<NetnsConnector> {
        let path = PathBuf::from("/run/netns").join(ns);
        let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let (tx, rx) = mpsc::channel::<ConnectRequest>();
        let (ready_tx, ready_rx) = mpsc::channel::<std::io::Result<()>>();
        let name = format!("netns-{ns}");
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                // SAFETY: setns on a descriptor we own; it only changes this thread's network namespace.
                let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                let res = if r == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                };
                let ok = res.is_ok();
                let _ = ready_tx.send(res);
                if !ok {
                    return;
                }
                drop(file);
                for (addr, reply) in rx {
                    let _ = reply.send(std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)));
                }
            })
            .context("starting the netns connector thread")?;
        ready_rx
            .recv()
            .map_err(|_| anyhow!("netns connector thread died"))?
            .with_context(|| format!("entering namespace {ns}"))?;
        Ok(NetnsConnector { tx })
    }

    /// Connect to `addr` from inside the namespace.
    pub async fn connect(&self, addr: SocketAddr) -> Result<tokio::net::TcpStream> {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.tx
            .send((addr, reply_tx))
            .map_err(|_| anyhow!("netns connector thread is gone"))?;
        let std_stream = reply_rx
            .await
            .map_err(|_| anyhow!("netns connector thread is gone"))?
            .with_context(|| format!("connecting to {addr}"))?;
        std_stream.set_nonblocking(true)?;
        Ok(tokio::net::TcpStream::from_std(std_stream)?)
    }
}

/// The root-namespace entry to the apiserver: 127.0.0.1:<port> spliced to `<cp IP>:6443` inside `orca-cp`.
struct Relay {
    port: u16,
    task: JoinHandle<()>,
}

impl Relay {
    async fn start(connector: NetnsConnector, target: SocketAddr) -> Result<Relay> {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("binding the apiserver relay on 127.0.0.1")?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let (mut inbound, peer) = match accepted {
                            Ok(x) => x,
                            Err(e) => {
                                tracing::warn!("relay accept failed: {e}");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        };
                        let connector = connector.clone();
                        conns.spawn(async move {
                            match connector.connect(target).await {
                                Ok(mut outbound) => {
                                    let _ = inbound.set_nodelay(true);
                                    let _ = outbound.set_nodelay(true);
                                    if let Err(e) =
                                        tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await
                                    {
                                        tracing::debug!("relay connection from {peer} ended: {e}");
                                    }
                                }
                                Err(e) => tracing::debug!("relay could not reach {target}: {e:#}"),
                            }
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(Relay { port, task })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The apiserver answers `ok` on /readyz.
async fn readyz(c: Client) -> Result<()> {
    let req = http::Request::get("/readyz").body(Vec::new())?;
    let text = tokio::time::timeout(Duration::from_secs(5), c.request_text(req))
        .await
        .map_err(|_| anyhow!("timed out"))??;
    if text.trim() == "ok" {
        Ok(())
    } else {
        bail!("readyz said {text:?}")
    }
}

/// A running sandbox. Dropping it tears everything down (like [`Sandbox::down`], without the report).
pub struct Sandbox {
    topology: Topology,
    files: RunFiles,
    bin_dir: PathBuf,
    children: Vec<(String, Child)>,
    relay: Option<Relay>,
    connector: Option<NetnsConnector>,
    client: Option<Client>,
    _etcd_dir: Option<tempfile::TempDir>,
    lock: Option<SandboxLock>,
    torn_down: bool,
    /// kube-apiserver's command line, to restart it.
    apiserver_args: Vec<String>,
}

fn log_tail(name: &str) -> String {
    let path = netns::log_dir().join(format!("{name}.log"));
    match std::fs::read_to_string(&path) {
        Ok(t) => {
            let lines: Vec<&str> = t.lines().collect();
            let from = lines.len().saturating_sub(15);
            format!("last lines of {}:\n{}", path.display(), lines[from..].join("\n"))
        }
        Err(e) => format!("(no log at {}: {e})", path.display()),
    }
}

impl Sandbox {
    /// Bring the whole sandbox up: (build,) clean leftovers, create the topology, generate credentials, start
    /// etcd, the apiserver and the controller-manager, wait until they work, register the Nodes.
    ///
    /// Needs root. Must run inside a tokio runtime that outlives the sandbox (the relay runs on it); prefer a
    /// multi-threaded one (`#[tokio::test(flavor = "multi_thread")]`): on a current-thread runtime the relay only
    /// moves bytes while the test awaits, so a blocking wait on a subprocess that uses [`Sandbox::kubeconfig`]
    /// would hang.
    pub async fn up(opts: SandboxOptions) -> Result<Sandbox> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the sandbox needs root (network namespaces, veth pairs)");
        }
        opts.topology.validate()?;
        let bin_dir = match opts.bin_dir.clone() {
            Some(d) => d,
            None => tokio::task::spawn_blocking(build::ensure_k8s_binaries).await??,
        };
        for b in ["etcd", "kube-apiserver", "kube-controller-manager"] {
            if !bin_dir.join(b).is_file() {
                bail!("{} has no {b} binary", bin_dir.display());
            }
        }
        let lock_timeout = opts.lock_timeout;
        let lock = tokio::task::spawn_blocking(move || SandboxLock::acquire(lock_timeout)).await??;
        install_signal_handler();
        let leftovers = tokio::task::spawn_blocking(netns::teardown).await?;
        if !leftovers.is_empty() {
            eprintln!(
                "[orca-sandbox] removed leftovers of an earlier run: {}",
                leftovers.join(", ")
            );
        }
        let files = RunFiles {
            dir: crate::sandbox_dir().join("run"),
        };
        for d in [&files.dir, &netns::log_dir()] {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        ACTIVE.store(true, Ordering::SeqCst);
        let mut sb = Sandbox {
            topology: opts.topology.clone(),
            files,
            bin_dir,
            children: Vec::new(),
            relay: None,
            connector: None,
            client: None,
            _etcd_dir: None,
            lock: Some(lock),
            torn_down: false,
            apiserver_args: Vec::new(),
        };
        // From here on, an error drops `sb`, which tears down what was created.
        sb.start(&opts).await?;
        Ok(sb)
    }

    async fn start(&mut self, opts: &SandboxOptions) -> Result<()> {
        let t0 = Instant::now();
        let topo = self.topology.clone();
        tokio::task::spawn_blocking(move || topo.create())
            .await?
            .context("creating the network topology")?;
        progress("topology up", t0);

        let cp_ns = self.topology.control_plane.netns.clone();
        let cp_ip = self.topology.control_plane.ip;
        let connector = NetnsConnector::new(&cp_ns)?;
        self.connector = Some(connector.clone());
        let relay = Relay::start(connector.clone(), SocketAddr::from((cp_ip, APISERVER_PORT))).await?;
        let relay_port = relay.port;
        self.relay = Some(relay);
        generate_credentials(&self.files, &self.topology, relay_port)?;

        // etcd: loopback inside orca-cp, data in a temp dir (tmpfs when there is one).
        let shm = Path::new("/dev/shm");
        let etcd_dir = if shm.is_dir() {
            tempfile::Builder::new().prefix("orca-etcd-").tempdir_in(shm)
        } else {
            tempfile::Builder::new().prefix("orca-etcd-").tempdir()
        }
        .context("creating etcd's data dir")?;
        let etcd = self.bin_dir.join("etcd");
        let data_dir = etcd_dir.path().join("data");
        let client_url = format!("http://127.0.0.1:{ETCD_CLIENT_PORT}");
        let peer_url = "http://127.0.0.1:2380";
        let args: Vec<String> = vec![
            path_str(&etcd)?,
            "--name=orca-cp".into(),
            format!("--data-dir={}", path_str(&data_dir)?),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=orca-cp={peer_url}"),
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ];
        self._etcd_dir = Some(etcd_dir);
        self.spawn_cp("etcd", &args)?;
        let etcd_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, ETCD_CLIENT_PORT));
        self.wait_for("etcd", opts.start_timeout, || {
            let c = connector.clone();
            async move { c.connect(etcd_addr).await.map(|_| ()) }
        })
        .await?;
        progress("etcd up", t0);

        let f = &self.files;
        let topo = &self.topology;
        let args: Vec<String> = vec![
            path_str(&self.bin_dir.join("kube-apiserver"))?,
            format!("--etcd-servers={client_url}"),
            format!("--bind-address={cp_ip}"),
            format!("--advertise-address={cp_ip}"),
            format!("--secure-port={APISERVER_PORT}"),
            format!("--tls-cert-file={}", path_str(&f.path("apiserver.crt"))?),
            format!("--tls-private-key-file={}", path_str(&f.path("apiserver.key"))?),
            format!("--client-ca-file={}", path_str(&f.ca_cert())?),
            // Published in kube-system/extension-apiserver-authentication, which the controller-manager reads;
            // no front-proxy certificate is issued, so nothing can use these headers.
            format!("--requestheader-client-ca-file={}", path_str(&f.ca_cert())?),
            "--requestheader-allowed-names=front-proxy-client".into(),
            "--requestheader-username-headers=X-Remote-User".into(),
            "--requestheader-group-headers=X-Remote-Group".into(),
            "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
            "--authorization-mode=RBAC".into(),
            // Dual-stack, IPv4 first (the `kubernetes` Service and single-stack Services stay IPv4).
            format!(
                "--service-cluster-ip-range={},{}",
                topo.service_cidr,
                crate::topology::SERVICE_CIDR_V6
            ),
            format!(
                "--service-node-port-range={}-{}",
                topo.node_port_range.0, topo.node_port_range.1
            ),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", path_str(&f.path("sa.pub"))?),
            format!("--service-account-signing-key-file={}", path_str(&f.path("sa.key"))?),
            // No node-lifecycle controller removes the not-ready taint, so do not add it.
            "--disable-admission-plugins=TaintNodesByCondition".into(),
            "--enable-priority-and-fairness=false".into(),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
            format!("--v={}", opts.verbosity),
        ];
        self.spawn_cp("kube-apiserver", &args)?;
        self.apiserver_args = args;
        let client = self.make_client().await?;
        self.client = Some(client.clone());
        self.wait_for("kube-apiserver /readyz", opts.start_timeout, || readyz(client.clone()))
            .await?;
        progress("kube-apiserver ready", t0);

        let f = &self.files;
        let kcm_kubeconfig = path_str(&f.controller_manager_kubeconfig())?;
        let args: Vec<String> = vec![
            path_str(&self.bin_dir.join("kube-controller-manager"))?,
            format!("--kubeconfig={kcm_kubeconfig}"),
            format!("--authentication-kubeconfig={kcm_kubeconfig}"),
            format!("--authorization-kubeconfig={kcm_kubeconfig}"),
            "--bind-address=127.0.0.1".into(),
            "--leader-elect=false".into(),
            format!("--controllers={}", CONTROLLERS.join(",")),
            format!("--root-ca-file={}", path_str(&f.ca_cert())?),
            format!("--service-account-private-key-file={}", path_str(&f.path("sa.key"))?),
            // Each controller runs as its own service account (system:controller:<name>), with upstream's RBAC roles.
            "--use-service-account-credentials=true".into(),
            "--profiling=false".into(),
            format!("--v={}", opts.verbosity),
        ];
        self.spawn_cp("kube-controller-manager", &args)?;
        // The serviceaccount controller creating `default/default` proves the controller-manager works.
        self.wait_for("kube-controller-manager", opts.start_timeout, || {
            let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
            async move {
                sas.get("default").await?;
                Ok(())
            }
        })
        .await?;
        progress("kube-controller-manager working", t0);

        self.register_nodes(&client).await?;
        progress("sandbox up", t0);
        Ok(())
    }

    /// Stops kube-apiserver (SIGTERM), keeps it down for `down_for`, starts it again with the same flags and waits
    /// for /readyz: clients see their watches break and the apiserver come back, as in a control-plane upgrade.
    pub async fn restart_apiserver(&mut self, down_for: Duration) -> Result<()> {
        let idx = self
            .children
            .iter()
            .position(|(n, _)| n == "kube-apiserver")
            .ok_or_else(|| anyhow!("kube-apiserver is not running"))?;
        let (name, mut child) = self.children.remove(idx);
        netns::terminate(&[child.id()], Duration::from_secs(10));
        let _ = child.wait();
        tokio::time::sleep(down_for).await;
        let args = self.apiserver_args.clone();
        self.spawn_cp(&name, &args)?;
        let client = self.admin_client();
        self.wait_for("kube-apiserver /readyz after restart", Duration::from_secs(120), || {
            readyz(client.clone())
        })
        .await
    }

    fn spawn_cp(&mut self, name: &str, args: &[String]) -> Result<()> {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = netns::spawn(&self.topology.control_plane.netns, &argv, name)?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    /// Poll `probe` every 250 ms until it succeeds, failing early when a control-plane process exited.
    async fn wait_for<F, Fut>(&mut self, what: &str, timeout: Duration, mut probe: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let deadline = Instant::now() + timeout;
        let mut last_err = anyhow!("never probed");
        loop {
            for (name, child) in &mut self.children {
                if let Some(status) = child.try_wait()? {
                    bail!("{name} exited ({status}) while waiting for {what}; {}", log_tail(name));
                }
            }
            match probe().await {
                Ok(()) => return Ok(()),
                Err(e) => last_err = e,
            }
            if Instant::now() >= deadline {
                bail!("{what} not ready after {timeout:?}: {last_err:#}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn make_client(&self) -> Result<Client> {
        client_from_kubeconfig(&self.files.admin_kubeconfig()).await
    }

    async fn register_nodes(&self, client: &Client) -> Result<()> {
        let nodes: Api<Node> = Api::all(client.clone());
        let now = serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ))?;
        for n in &self.topology.nodes {
            let node: Node = serde_json::from_value(json!({
                "metadata": {
                    "name": n.name,
                    "labels": {
                        "kubernetes.io/hostname": n.name,
                        "kubernetes.io/os": "linux",
                        "topology.kubernetes.io/zone": n.zone,
                        "orca.dev/sandbox": "true",
                    },
                },
                "spec": {
                    "podCIDR": n.pod_cidr.to_string(),
                    "podCIDRs": [n.pod_cidr.to_string(), n.pod_cidr.v6()],
                },
            }))?;
            nodes
                .create(&PostParams::default(), &node)
                .await
                .with_context(|| format!("creating Node {}", n.name))?;
            let condition = |type_: &str, status: &str, reason: &str| {
                json!({
                    "type": type_, "status": status, "reason": reason,
                    "message": "set by the orca sandbox",
                    "lastHeartbeatTime": now, "lastTransitionTime": now,
                })
            };
            let status = json!({
                "status": {
                    "addresses": [
                        {"type": "InternalIP", "address": n.ip.to_string()},
                        {"type": "InternalIP", "address": crate::topology::v6(n.ip).to_string()},
                        {"type": "Hostname", "address": n.name},
                    ],
                    "conditions": [
                        condition("Ready", "True", "KubeletReady"),
                        condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                        condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                        condition("PIDPressure", "False", "KubeletHasSufficientPID"),
                    ],
                    "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
                    "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
                },
            });
            nodes
                .patch_status(&n.name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .with_context(|| format!("setting the status of Node {}", n.name))?;
        }
        // The default namespace exists once the apiserver is ready; check it, as a sanity check of the client.
        Api::<Namespace>::all(client.clone()).get("default").await?;
        Ok(())
    }

    /// The layout.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Admin kubeconfig usable from the root namespace (through the relay, while this `Sandbox` lives).
    pub fn kubeconfig(&self) -> PathBuf {
        self.files.admin_kubeconfig()
    }

    /// Admin kubeconfig usable from inside the sandbox's namespaces (node, client, cp): `https://<cp IP>:6443`.
    pub fn fabric_kubeconfig(&self) -> PathBuf {
        self.files.fabric_kubeconfig()
    }

    /// kube-proxy's kubeconfig (`system:kube-proxy`), for proxies running in node namespaces.
    pub fn kube_proxy_kubeconfig(&self) -> PathBuf {
        self.files.kube_proxy_kubeconfig()
    }

    /// The run's credentials directory (`ca.crt`, certificates, keys, kubeconfigs).
    pub fn run_dir(&self) -> &Path {
        &self.files.dir
    }

    /// Directory of the control-plane binaries (kube-proxy is there too).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The apiserver's URL on the fabric.
    pub fn apiserver_url(&self) -> String {
        format!("https://{}:{APISERVER_PORT}", self.topology.control_plane.ip)
    }

    /// A cluster-admin client (root namespace, through the relay).
    pub fn admin_client(&self) -> Client {
        match &self.client {
            Some(c) => c.clone(),
            // `up` only returns a Sandbox after the client was made.
            None => unreachable!("Sandbox::up returned without a client"),
        }
    }

    /// Fail when a control-plane process (etcd, kube-apiserver, kube-controller-manager) has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if !ACTIVE.load(Ordering::SeqCst) {
            // The signal handler is tearing down (and will exit the process); do not report its kills.
            return Ok(());
        }
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                bail!("{name} exited ({status}); {}", log_tail(name));
            }
        }
        Ok(())
    }

    /// Open a TCP connection from inside the control-plane namespace (e.g. to a pod IP or a Service).
    pub async fn connect_from_cp(&self, addr: SocketAddr) -> Result<tokio::net::TcpStream> {
        match &self.connector {
            Some(c) => c.connect(addr).await,
            None => bail!("sandbox is down"),
        }
    }

    /// Tear everything down and report what was removed; errors if an `orca-*` namespace survived.
    pub fn down(mut self) -> Result<Vec<String>> {
        let removed = self.teardown();
        let left = netns::list_sandbox_netns();
        if !left.is_empty() {
            bail!("namespaces left after teardown: {left:?}");
        }
        Ok(removed)
    }

    fn teardown(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        self.client = None;
        self.relay = None;
        self.connector = None;
        // netns::teardown stops everything recorded: clients of the apiserver, then the apiserver, then etcd.
        let removed = netns::teardown();
        for (_, c) in &mut self.children {
            let _ = c.wait();
        }
        self.children.clear();
        self._etcd_dir = None;
        ACTIVE.store(false, Ordering::SeqCst);
        self.lock = None;
        removed
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if !self.torn_down {
            let removed = self.teardown();
            tracing::info!("sandbox torn down on drop ({} items)", removed.len());
        }
    }
}

fn progress(what: &str, t0: Instant) {
    eprintln!("[orca-sandbox] {what} ({:.1}s)", t0.elapsed().as_secs_f64());
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_string)
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}

/// A kube client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading {}", path.display()))?;
    Client::try_from(config).context("building the kube client")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_kubeconfigs_are_generated() {
        let dir = tempfile::tempdir().unwrap();
        let files = RunFiles {
            dir: dir.path().to_path_buf(),
        };
        generate_credentials(&files, &Topology::default(), 40000).unwrap();
        for f in [
            "ca.crt",
            "apiserver.crt",
            "apiserver.key",
            "admin.crt",
            "kube-proxy.key",
            "sa.key",
            "sa.pub",
        ] {
            let text = std::fs::read_to_string(dir.path().join(f)).unwrap();
            assert!(text.starts_with("-----BEGIN "), "{f}: {text}");
        }
        let admin = std::fs::read_to_string(files.admin_kubeconfig()).unwrap();
        assert!(admin.contains("server: https://127.0.0.1:40000"), "{admin}");
        let fabric = std::fs::read_to_string(files.kube_proxy_kubeconfig()).unwrap();
        assert!(fabric.contains("server: https://10.240.0.2:6443"), "{fabric}");
        assert!(fabric.contains("kube-proxy.crt"), "{fabric}");
        // The kubeconfigs parse as kube-rs kubeconfigs.
        Kubeconfig::read_from(files.admin_kubeconfig()).unwrap();
    }
}
