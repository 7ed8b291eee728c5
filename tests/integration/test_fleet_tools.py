"""Fleet tooling on the golden image: cloud-init (NoCloud seed) and Ansible (ansible-core).

The image is the fleet tests' golden image (fleetlib) on a base that also carries Debian's
``cloud-init`` and ``ansible-core``; both devices boot in parallel against the SAS test hub.

- cloud-init: a NoCloud seed in the device's disk (as a provisioning tool or the SD card would
  carry it); its ``write_files`` puts the connection string in ``/run/credstore`` (0600) in
  cloud-init.service, and defender-setup-import.service, ordered after it, imports it at that
  same first boot.
- Ansible: ``ansible-playbook`` with ``connection: local`` inside a booted device drives the
  debconf path: ``ansible.builtin.debconf`` with ``vtype: password`` and ``no_log: true``, then
  ``dpkg-reconfigure -f noninteractive defender-setup``. The secret reaches the playbook from a
  0600 vars file, never a command line.
"""

from __future__ import annotations

import fleetlib as fl
import pytest

TOOLS = ("cloud-init", "ansible-core")
REGISTERED = {"ci-1": fl.key(21), "ans-1": fl.key(22)}

USER_DATA = """\
#cloud-config
# The minimal test image has no locales package: leave the locale alone.
locale: false
write_files:
  - path: /run/credstore/defender-setup.connection-string
    owner: root:root
    permissions: "0600"
    content: "{connection_string}"
"""

PLAYBOOK = """\
- hosts: localhost
  connection: local
  gather_facts: false
  vars_files:
    - /root/device-secrets.yml
  tasks:
    - name: the method
      ansible.builtin.debconf:
        name: defender-setup
        question: defender-setup/auth-method
        vtype: select
        value: connection-string
    - name: the connection string (a secret)
      ansible.builtin.debconf:
        name: defender-setup
        question: defender-setup/connection-string
        vtype: password
        value: "{{ defender_connection_string }}"
      no_log: true
    - name: configure, restart once and verify
      ansible.builtin.command: dpkg-reconfigure -f noninteractive defender-setup
      environment:
        DEBIAN_FRONTEND: noninteractive
"""


@pytest.fixture(scope="module")
def fleet(deb, tmp_path_factory):
    work = tmp_path_factory.mktemp("fleet-tools")
    with fl.running(deb, work, REGISTERED, extra=TOOLS) as the_fleet:
        yield the_fleet


@pytest.fixture(scope="module")
def devices(fleet):
    found = {"ci-1": fleet.device("ci-1"), "ans-1": fleet.device("ans-1")}
    seed = "/var/lib/cloud/seed/nocloud"
    fl.put(found["ci-1"].rootfs, f"{seed}/meta-data",
           "instance-id: ci-1\nlocal-hostname: ci-1\n", mode=0o600)
    fl.put(found["ci-1"].rootfs, f"{seed}/user-data", USER_DATA.format(
        connection_string=fl.sas_string("ci-1", REGISTERED["ci-1"])), mode=0o600)
    fl.boot_all(list(found.values()))
    return found


def test_cloud_init_write_files_gives_the_device_its_identity_at_first_boot(devices):
    ct = devices["ci-1"]
    assert fl.status_text(ct) == f"connected to {fl.HUB} as ci-1/{fl.MODULE}", \
        fl.journal(ct, "-u", "cloud-init", "-u", fl.IMPORT, "-u", fl.VERIFY)
    status = ct.run(["cloud-init", "status", "--long"], check=False).stdout
    assert "status: done" in status, status
    assert fl.failed_units(ct) == []
    assert ct.run(["stat", "-c", "%a %U", "/run/credstore/defender-setup.connection-string"]
                  ).stdout.strip() == "600 root"
    report = fl.status_json(ct)
    assert report["origin"]["source"] == "credential"
    assert report["last_import"]["result"] == "verified"
    # the import ran after cloud-init.service had written the file
    after = ct.run(["systemctl", "show", "-p", "After", fl.IMPORT]).stdout
    assert "cloud-init.service" in after
    fl.assert_no_secret(ct, REGISTERED["ci-1"])


def test_ansible_debconf_password_then_dpkg_reconfigure(devices):
    ct = devices["ans-1"]
    secret = REGISTERED["ans-1"]
    ct.copy_in(PLAYBOOK, "/root/play.yml", mode=0o644)
    ct.copy_in(f'defender_connection_string: "{fl.sas_string("ans-1", secret)}"\n',
               "/root/device-secrets.yml")
    run = ct.run(["ansible-playbook", "-i", "localhost,", "/root/play.yml"], check=False,
                 timeout=300, env={"ANSIBLE_NOCOLOR": "1"})
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert secret not in out  # no_log
    assert fl.status_text(ct) == f"connected to {fl.HUB} as ans-1/{fl.MODULE}", out
    assert fl.status_json(ct)["origin"]["source"] == "debconf"
    for db in ("/var/cache/debconf/config.dat", "/var/cache/debconf/passwords.dat"):
        assert secret not in ct.read(db), db  # password type, cleared once written
    assert fl.failed_units(ct) == []
    assert ct.show(fl.UNIT, "NRestarts")["NRestarts"] == "0"
    fl.assert_no_secret(ct, secret)
