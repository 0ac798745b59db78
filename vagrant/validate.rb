# Offline check of the Vagrantfile where Vagrant cannot run (`vagrant validate` needs Vagrant
# and its box): loads it against a recording stand-in for Vagrant's configuration object and
# checks what it would build: one VM per inventory host, with the inventory's addresses, and
# an Ansible provisioner whose playbook, config and groups exist.
#   ruby vagrant/validate.rb
class Recorder
  attr_reader :calls, :children
  def initialize; @calls = []; @children = {}; end
  def method_missing(name, *args, **kw, &block)
    child = (@children[name] ||= Recorder.new)
    @calls << [name, args, kw]
    block&.call(child)
    child
  end
  def respond_to_missing?(*) = true
  def define(name, &block) = (@defines ||= {})[name] = Recorder.new.tap { |r| block.call(r) }
  def defines = @defines || {}
  def provision(kind, **kw, &block)
    (@provisioners ||= []) << [kind, kw, Recorder.new.tap { |r| block&.call(r) }]
  end
  def provisioners = @provisioners || []
end

module Vagrant
  def self.configure(version)
    raise "Vagrantfile: configure(#{version.inspect}), expected \"2\"" unless version == "2"
    yield($config = Recorder.new)
  end
end

file = File.expand_path("Vagrantfile", __dir__)
eval(File.read(file), binding, file)
fail = ->(msg) { warn "vagrant/validate.rb: #{msg}"; exit 1 }

vms = $config.vm.defines
fail.("no VM defined") if vms.empty?
fail.("VMs #{vms.keys} are not the inventory's hosts #{HOSTS.keys}") unless vms.keys.sort == HOSTS.keys.sort
vms.each do |name, host|
  ips = host.vm.calls.select { |c| c[0] == :network }.map { |c| c[2][:ip] }
  want = [HOSTS[name]["lab_ipv4"], HOSTS[name]["lab_ipv6"]]
  fail.("#{name}: addresses #{ips}, inventory says #{want}") unless ips == want
end
ansible = vms.values.flat_map { |h| h.vm.provisioners }.select { |p| p[0] == "ansible" }
fail.("expected one Ansible provisioner, found #{ansible.size}") unless ansible.size == 1
settings = ansible[0][2].calls.to_h { |c| [c[0].to_s.delete_suffix("="), c[1][0]] }
%w[playbook config_file].each do |key|
  fail.("Ansible #{key} #{settings[key].inspect} does not exist") unless settings[key] && File.exist?(settings[key])
end
fail.("Ansible limit must be all,localhost (the CA play runs on localhost)") unless settings["limit"] == "all,localhost"
fail.("Ansible groups #{settings['groups'].keys} miss mailservers/dns_servers/senders") unless
  %w[mailservers dns_servers senders].all? { |g| settings["groups"].key?(g) }
puts "vagrant/Vagrantfile: #{vms.size} VMs (#{vms.keys.join(', ')}), addresses from the inventory, one Ansible run of #{File.basename(settings['playbook'])}"
