# Homebrew formula for digestfs on macOS: built from source with cargo, without FUSE. Views are
# served over NFSv3 on localhost and mounted with macOS's own NFS client (mount_nfs), so no
# macFUSE or kernel extension is needed. See docs/macos.md for what has and has not been tested.
#
# `url` and `sha256` name a source tarball of a release; fill them in when one is published.
# Until then, build from a checkout: `cargo install --locked --no-default-features --path .`.
class Digestfs < Formula
  desc "Read-only views over the Pants build system's content-addressed local store"
  homepage "https://www.pantsbuild.org"
  url "https://example.invalid/digestfs-0.1.0.tar.gz" # set at release time
  sha256 "0000000000000000000000000000000000000000000000000000000000000000" # set at release time
  license "Apache-2.0"

  depends_on "rust" => :build
  depends_on :macos

  def install
    # No default features: the `fuse` feature is Linux-only and would add nothing here; this
    # keeps the build explicit about serving NFS only.
    system "cargo", "install", "--no-default-features", *std_cargo_args
    system bin/"digestfs", "generate-assets", buildpath/"assets"
    man1.install Dir[buildpath/"assets/man/*.1"]
    bash_completion.install buildpath/"assets/completions/digestfs.bash" => "digestfs"
    zsh_completion.install buildpath/"assets/completions/_digestfs"
    fish_completion.install buildpath/"assets/completions/digestfs.fish"
  end

  def caveats
    <<~EOS
      digestfs mounts through macOS's NFS client (no macFUSE). For Pants' BSP server the
      mountpoint is .pants.d/bsp/jvm/resolves, never .pants.d/bsp itself (Pants writes compile
      output, resources and its launcher there):
        digestfs mount --daemon --reuse .pants.d/bsp/jvm/resolves
        digestfs bind .pants.d/bsp/jvm/resolves default/lib <digest> --layer modules.pants:app
      The daemon serves NFSv3 on 127.0.0.1 and runs mount_nfs; `digestfs unmount DIR` or
      `umount DIR` undoes it. If mount_nfs is not permitted for your user, serve with
      --nfs-no-mount and mount by hand with the command in docs/macos.md.
    EOS
  end

  test do
    (testpath/"src/lib/a.jar").write "jar bytes"
    store = testpath/"store"
    digest = shell_output("#{bin}/digestfs --store #{store} import #{testpath}/src").strip
    assert_match "lib/a.jar", shell_output("#{bin}/digestfs --store #{store} ls -R #{digest}")
    # Serve it over NFS without mounting; `status` names the port.
    socket = testpath/"ctl.sock"
    (testpath/"mnt").mkpath
    exe = (bin/"digestfs").to_s
    pid = spawn exe, "--store", store.to_s, "mount", "--frontend", "nfs", "--nfs-no-mount",
                "--control", socket.to_s, "--bind", "v=#{digest}", (testpath/"mnt").to_s
    begin
      30.times { break if socket.exist?; sleep 1 }
      status = shell_output("#{bin}/digestfs status #{testpath}/mnt --control #{socket}")
      assert_match(/nfs +127\.0\.0\.1 port \d+/, status)
    ensure
      Process.kill("TERM", pid)
      Process.wait(pid)
    end
  end
end
